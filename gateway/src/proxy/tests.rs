//! Unit tests of the proxy's pure parts.

use super::*;
use http::Uri;

#[test]
fn free_paths_match_exactly_or_by_prefix() {
    let routes: Vec<_> = ["/health", "/public/*"]
        .iter()
        .map(|p| crate::config::Route::free(p))
        .collect();
    let f = crate::routes::Routes::new(&routes);
    assert!(f.is_free("GET", "/health"));
    assert!(!f.is_free("GET", "/healthz"));
    assert!(f.is_free("POST", "/public/a/b"));
    assert!(!f.is_free("GET", "/private"));
}

#[test]
fn every_spelling_of_our_headers_is_removed_and_the_rest_kept() {
    let mut req = RequestHeader::build("GET", b"/", None).unwrap();
    for (k, v) in [
        ("X_Tollgate_License_Id", "7"),
        ("x-tollgate-plan", "enterprise"),
        ("X-TOLLGATE_GUEST", "g"),
        ("X_License_Key", "tg_abc"),
        ("Tollgate_Usage", "audio_seconds=0"),
        ("tollgate-usage", "audio_seconds=0"),
        ("x-tollgate", "not ours: no suffix"),
        ("X-Request-Id", "kept"),
    ] {
        req.append_header(k.to_string(), v).unwrap();
    }
    remove_spoofed_headers(
        &mut req,
        true,
        false,
        &HeaderName::from_static("tollgate-usage"),
    );
    let mut left: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
    left.sort_unstable();
    assert_eq!(left, ["x-request-id", "x-tollgate"]);
}

#[test]
fn http_1_0_closes_unless_the_client_asks_for_keep_alive() {
    let req = |version, connection: Option<&str>| {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.set_version(version);
        if let Some(c) = connection {
            r.insert_header("Connection", c).unwrap();
        }
        client_keeps_alive(&r)
    };
    use http::Version;
    assert!(!req(Version::HTTP_10, None));
    assert!(req(Version::HTTP_10, Some("Keep-Alive")));
    assert!(req(Version::HTTP_10, Some("foo, keep-alive")));
    assert!(!req(Version::HTTP_10, Some("keep-alive, close")));
    assert!(req(Version::HTTP_11, None));
    assert!(!req(Version::HTTP_11, Some("Close")));
    assert!(req(Version::HTTP_11, Some("upgrade")));
}

#[test]
fn the_key_is_removed_from_the_uri_and_the_rest_kept() {
    let uri: Uri = "/a/b?x=1&license_key=tg_abc&y=2".parse().unwrap();
    assert_eq!(strip_key_from_uri(&uri).unwrap(), "/a/b?x=1&y=2");
    let uri: Uri = "/a?license_key=tg_abc".parse().unwrap();
    assert_eq!(strip_key_from_uri(&uri).unwrap(), "/a");
}

/// Found by the `key_extraction` fuzz target: a target without a path (authority form)
/// failed to rebuild.
#[test]
fn fuzz_regressions_targets_without_a_path_rebuild() {
    for (target, want) in [
        ("(p", "(p"),
        ("http://h?license_key=tg_abc&a=1", "http://h/?a=1"),
        ("http://h?license_key=tg_abc", "http://h/"),
        ("http://h", "http://h/"),
    ] {
        let uri: Uri = target.parse().unwrap();
        assert_eq!(strip_key_from_uri(&uri).unwrap(), want, "{target}");
    }
}
