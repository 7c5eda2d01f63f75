//! `Stripe-Signature` parsing and verification: any header and body, checked against an
//! independently computed HMAC-SHA256 over "{t}.{body}" with the whole secret, `t` formatted
//! from its parsed value as Stripe's own libraries do (any `v1` may match, `t` within the
//! tolerance).
//!
//! Input: header and body separated by the first 0xFF byte.
#![no_main]

use admin::stripe::{verify_signature, SignatureError};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const SECRET: &str = "whsec_fuzz_secret";
const NOW: i64 = 1_700_000_000;
const TOLERANCE: u64 = 300;

fn sign(t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let secrets = [SECRET.to_string()];
    let got = verify_signature(Some(header), body, &secrets, TOLERANCE, NOW);
    if got.is_ok() {
        // accepted only with one t, within the tolerance, and a v1 that is the real HMAC
        let header = std::str::from_utf8(header).expect("accepted headers are UTF-8");
        let parts: Vec<(&str, &str)> = header
            .split(',')
            .map(|p| p.trim().split_once('=').expect("accepted parts are k=v"))
            .collect();
        let ts: Vec<&str> = parts
            .iter()
            .filter(|(k, _)| *k == "t")
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(ts.len(), 1);
        let t: i64 = ts[0].parse().unwrap();
        assert!(NOW.abs_diff(t) <= TOLERANCE);
        let want = sign(t, body);
        assert!(
            parts
                .iter()
                .any(|(k, v)| *k == "v1" && v.eq_ignore_ascii_case(&want)),
            "accepted without the signature"
        );
    }

    // a correctly signed header for this body is accepted, whatever t the input suggests
    let t = NOW - (body.len() as i64 % 300);
    let good = format!("t={t},v1={}", sign(t, body));
    assert_eq!(
        verify_signature(Some(good.as_bytes()), body, &secrets, TOLERANCE, NOW),
        Ok(())
    );
    // and the same with the body changed by one byte is not
    if let Some((first, rest)) = body.split_first() {
        let mut other = vec![first.wrapping_add(1)];
        other.extend_from_slice(rest);
        assert_eq!(
            verify_signature(Some(good.as_bytes()), &other, &secrets, TOLERANCE, NOW),
            Err(SignatureError::NoMatch)
        );
    }
});
