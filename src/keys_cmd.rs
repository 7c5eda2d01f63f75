//! `tollgate keys …`: license management straight on the database file. A running gateway picks
//! the changes up within `storage.refresh_interval_ms`.

use std::process::ExitCode;

use admin::error::ApiError;
use admin::service::licenses::{self, AdjustBody, CreateBody, KeyBody, KeyLimitsBody};
use admin::service::Service;
use admin::views::{KeyView, KeyWithSecret, LicenseView, LicenseWithKey};
use anyhow::Context;
use clap::Subcommand;
use gateway::config::Config;
use gateway::display::BalanceUnit;
use gateway::errors::ErrorCode;
use gateway::ledger::now_ms;
use gateway::store::{Adjustment, License, LicenseKey};
use gateway::timefmt;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a license; its key is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        company: Option<String>,
        /// Prepaid hours (decimals allowed).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        hours: f64,
        #[arg(long, default_value = "free")]
        plan: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List licenses.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one license.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Credit hours to a license.
    AddHours {
        id: i64,
        #[arg(allow_negative_numbers = true)]
        hours: f64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Add a key to a license (same balance and plan); the key is printed once.
    Add {
        id: i64,
        /// What the key is for: a developer, an environment, a machine.
        #[arg(long, default_value = "key")]
        name: String,
        /// When the key stops working: an RFC 3339 time or a date (its license works on).
        #[arg(long)]
        expires: Option<String>,
        /// The key's own rate limit, requests a second (beside the plan's).
        #[arg(long)]
        requests_per_second: Option<u32>,
        /// The key's own cap on requests in flight at once (beside the plan's).
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// The request time the key may use in a UTC day, in seconds.
        #[arg(long)]
        max_seconds_per_day: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a license (every key stops working), or with --key one of its keys.
    Revoke {
        id: i64,
        /// The key to revoke (its id, from `keys show`); the others work on.
        #[arg(long)]
        key: Option<i64>,
    },
    /// Replace a license's key (the old one stops working, the new one is printed once), or
    /// with --key one of its keys (needed when it has several).
    Rotate {
        id: i64,
        #[arg(long)]
        key: Option<i64>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(config: &Config, command: KeysCommand) -> anyhow::Result<ExitCode> {
    let store = gateway::server::open_store(config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    // the same checks and writes as the API's, without a proxy to tell: a running gateway
    // picks the change up at its next refresh
    let svc = Service::offline(&*store, config);
    let failed_key = |id: i64, key_id: i64| {
        move |e: ApiError| match e.code {
            ErrorCode::NotFound => anyhow::anyhow!("license {id} has no key with id {key_id}"),
            _ => anyhow::anyhow!("{}", e.local_text()),
        }
    };
    let failed = |id: Option<i64>| {
        move |e: ApiError| match (e.code, id) {
            (ErrorCode::NotFound, Some(id)) => anyhow::anyhow!("no license with id {id}"),
            _ => anyhow::anyhow!("{}", e.local_text()),
        }
    };
    match command {
        KeysCommand::Create {
            name,
            email,
            company,
            hours,
            plan,
            json,
        } => {
            let new = CreateBody {
                name,
                email,
                company,
                hours: Some(hours),
                plan: Some(plan),
                expires_at: None,
            };
            let (license, key) = rt
                .block_on(licenses::create(&svc, new))
                .map_err(failed(None))?;
            print_with_key(&license, &key, json, &config.balance_unit);
        }
        KeysCommand::List { json } => {
            let all = rt.block_on(store.all_licenses())?;
            if json {
                let v: Vec<LicenseView> = all
                    .iter()
                    .map(|l| LicenseView::stored(l, &config.balance_unit))
                    .collect();
                println!("{}", json_text(&v));
            } else {
                print!("{}", list_table(&all));
            }
        }
        KeysCommand::Show { id, json } => {
            let l = rt
                .block_on(licenses::get(&svc, id))
                .map_err(failed(Some(id)))?;
            let keys = rt
                .block_on(licenses::keys(&svc, id))
                .map_err(failed(Some(id)))?;
            if json {
                // the license as `keys list --json` shows it, with its keys
                let mut v = serde_json::to_value(LicenseView::stored(&l, &config.balance_unit))
                    .expect("a view serializes");
                let listed: Vec<KeyView> = keys.iter().map(KeyView::from).collect();
                v["keys"] = serde_json::to_value(listed).expect("a view serializes");
                println!("{v}");
            } else {
                print_license(&l, false, &config.balance_unit);
                print!("{}", key_lines(&keys));
            }
            if !json && !config.meters.is_empty() {
                // what the app reported, as the console's license page shows it
                let stats = rt.block_on(store.usage_stats(id, 30, now_ms()))?;
                print!("{}", meter_lines(&config.meters, &stats.meters));
            }
        }
        KeysCommand::AddHours { id, hours, reason } => {
            let credit = AdjustBody {
                hours,
                reason: Some(reason.unwrap_or_else(|| "cli".into())),
                allow_overdraft: false,
            };
            let ms = licenses::hours_ms(hours, false).map_err(failed(None))?;
            let l = rt
                .block_on(licenses::adjust(&svc, id, Adjustment::Credit, credit))
                .map_err(failed(Some(id)))?;
            println!(
                "license {id}: {} added, {} remaining",
                timefmt::duration(ms),
                timefmt::duration(l.balance_ms)
            );
        }
        KeysCommand::Add {
            id,
            name,
            expires,
            requests_per_second,
            max_concurrent,
            max_seconds_per_day,
            json,
        } => {
            let body = KeyBody {
                name,
                expires_at: expires,
                limits: Some(KeyLimitsBody {
                    requests_per_second,
                    max_concurrent,
                    max_seconds_per_day,
                }),
            };
            let (_, k, key) = rt
                .block_on(licenses::add_key(&svc, id, body))
                .map_err(failed(Some(id)))?;
            print_key(&k, &key, json);
        }
        KeysCommand::Revoke { id, key: None } => {
            rt.block_on(licenses::revoke(&svc, id))
                .map_err(failed(Some(id)))?;
            println!("license {id}: revoked");
        }
        KeysCommand::Revoke {
            id,
            key: Some(key_id),
        } => {
            rt.block_on(licenses::revoke_key(&svc, id, key_id))
                .map_err(failed_key(id, key_id))?;
            println!("license {id}: key {key_id} revoked");
        }
        KeysCommand::Rotate {
            id,
            key: None,
            json,
        } => {
            let (l, key) = rt
                .block_on(licenses::rotate(&svc, id))
                .map_err(failed(Some(id)))?;
            print_with_key(&l, &key, json, &config.balance_unit);
        }
        KeysCommand::Rotate {
            id,
            key: Some(key_id),
            json,
        } => {
            let (_, k, key) = rt
                .block_on(licenses::rotate_key(&svc, id, key_id))
                .map_err(failed_key(id, key_id))?;
            print_key(&k, &key, json);
        }
    }
    store.close();
    Ok(ExitCode::SUCCESS)
}

fn json_text(v: &impl admin::views::Serialize) -> String {
    serde_json::to_string(v).expect("a view serializes")
}

fn print_with_key(l: &License, key: &str, json: bool, unit: &BalanceUnit) {
    if json {
        let v = LicenseWithKey {
            license: LicenseView::stored(l, unit),
            license_key: key.to_string(),
        };
        println!("{}", json_text(&v));
    } else {
        print!("{}", fields(l, Some(key), unit));
        println!("(shown once: store it now; only its hash is kept)");
    }
}

fn print_key(k: &LicenseKey, key: &str, json: bool) {
    if json {
        let v = KeyWithSecret {
            key: KeyView::from(k),
            license_key: key.to_string(),
        };
        println!("{}", json_text(&v));
    } else {
        print!("{}", key_lines(std::slice::from_ref(k)));
        println!("key: {key}");
        println!("(shown once: store it now; only its hash is kept)");
    }
}

/// A license's keys, a line each.
fn key_lines(keys: &[LicenseKey]) -> String {
    let mut rows = vec![vec!["keys:".to_string()]];
    for k in keys {
        rows.push(vec![
            format!("  {}", k.id),
            format!("{}…", k.key_prefix),
            k.status.as_str().to_string(),
            k.name.clone(),
            key_rules(k),
        ]);
    }
    columns(&rows, &[0])
}

/// A key's own expiry and limits, as a short line (empty: none).
fn key_rules(k: &LicenseKey) -> String {
    gateway::store::license_keys::rules_text(k, timefmt::rfc3339)
}

fn print_license(l: &License, json: bool, unit: &BalanceUnit) {
    if json {
        println!("{}", json_text(&LicenseView::stored(l, unit)));
    } else {
        print!("{}", fields(l, None, unit));
    }
}

/// Rows of text as aligned columns, two spaces apart; columns in `right` are right-aligned
/// (numbers and durations), the last column is never padded.
fn columns(rows: &[Vec<String>], right: &[usize]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width = |c: usize| {
        rows.iter()
            .filter_map(|r| r.get(c))
            .map(|v| v.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..n).map(width).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, v) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let w = widths[c];
            if right.contains(&c) {
                line.push_str(&format!("{v:>w$}"));
            } else if c + 1 < row.len() {
                line.push_str(&format!("{v:<w$}"));
            } else {
                line.push_str(v);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The units each meter counted in the last 30 days, and the balance they took.
fn meter_lines(meters: &[gateway::config::Meter], stats: &[gateway::store::MeterStats]) -> String {
    let mut rows = vec![vec!["units, 30 days:".to_string()]];
    for m in meters {
        let s = stats.iter().find(|s| s.meter == m.name);
        let (units, ms) = s.map_or((0, 0), |s| (s.units, s.charged_ms));
        rows.push(vec![
            format!("  {}:", m.name),
            format!("{units} {}", m.label),
            format!("({} of balance)", timefmt::exact_ms(ms)),
        ]);
    }
    columns(&rows, &[])
}

/// `keys list`: one license a line, under a header.
fn list_table(all: &[License]) -> String {
    let mut rows = vec![["ID", "KEY", "STATUS", "PLAN", "TIME LEFT", "NAME"]
        .map(String::from)
        .to_vec()];
    rows.extend(all.iter().map(|l| {
        vec![
            l.id.to_string(),
            format!("{}…", l.key_prefix),
            l.status.as_str().to_string(),
            l.plan.clone(),
            timefmt::duration(l.balance_ms),
            l.name.clone(),
        ]
    }));
    columns(&rows, &[0, 4])
}

/// A license as `name: value` lines, the values in one column; durations as the console shows
/// them, with the exact milliseconds beside.
fn fields(l: &License, key: Option<&str>, unit: &BalanceUnit) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let instant = |v: Option<i64>| v.map_or_else(|| "never".into(), timefmt::rfc3339);
    let time = |ms: i64| format!("{} ({})", timefmt::duration(ms), timefmt::exact_ms(ms));
    let mut rows: Vec<(&str, String)> = vec![
        ("id", l.id.to_string()),
        ("name", l.name.clone()),
        ("email", opt(&l.email)),
        ("company", opt(&l.company)),
        ("plan", l.plan.clone()),
        ("status", l.status.as_str().to_string()),
        ("key prefix", format!("{}…", l.key_prefix)),
        ("time remaining", time(l.balance_ms)),
        ("time used", time(l.used_ms)),
        ("requests", l.requests_total.to_string()),
        ("expires", instant(l.expires_at)),
        ("created", timefmt::rfc3339(l.created_at)),
        ("updated", timefmt::rfc3339(l.updated_at)),
        ("last used", instant(l.last_used_at)),
    ];
    if *unit != BalanceUnit::Hours {
        // the balance as the customer reads it ([display] balance_unit)
        rows.insert(8, ("balance", unit.balance(l.balance_ms)));
    }
    if let Some(key) = key {
        rows.push(("license key", key.into()));
    }
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, v)| vec![format!("{k}:"), v])
        .collect();
    columns(&rows, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn license(id: i64, name: &str, plan: &str, balance_ms: i64) -> License {
        License {
            id,
            key_hash: gateway::keys::KeyHash([0; 32]),
            key_prefix: "tg_abc123".into(),
            name: name.into(),
            email: None,
            company: None,
            plan: plan.into(),
            status: gateway::license::LicenseStatus::Active,
            balance_ms,
            used_ms: 65_400,
            requests_total: 0,
            version: 1,
            expires_at: None,
            created_at: 0,
            updated_at: 0,
            last_used_at: None,
            keys_version: 0,
            period_anchor: 0,
        }
    }

    /// Where each line's value starts: after the colon and the spaces.
    fn value_columns(text: &str) -> Vec<usize> {
        text.lines()
            .map(|line| {
                let colon = line.find(':').unwrap();
                let rest = &line[colon + 1..];
                line[..colon + 1].chars().count() + rest.chars().take_while(|c| *c == ' ').count()
            })
            .collect()
    }

    #[test]
    fn every_value_of_keys_show_starts_in_one_column() {
        let text = fields(
            &license(7, "Ada", "free", 17_940_000),
            Some("tg_secret"),
            &BalanceUnit::Hours,
        );
        let columns = value_columns(&text);
        assert!(columns.windows(2).all(|w| w[0] == w[1]), "{text}");
        assert!(
            text.contains(":  4 h 59 min (17,940,000 ms)\n"),
            "durations as the console shows them: {text}"
        );
        assert!(text.contains(" 1 min 5 s (65,400 ms)\n"), "{text}");
        assert!(text.contains("license key:"), "{text}");
    }

    #[test]
    fn keys_list_aligns_its_columns_whatever_their_width() {
        let all = [
            license(7, "Ada", "free", 3_599_000),
            license(1234, "Grace", "enterprise", -1_250),
            license(8, "Lin", "pro", 360_000_000),
        ];
        let text = list_table(&all);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        // every column starts where its header starts; numbers end where their header ends
        let start = |col: &str| lines[0][..lines[0].find(col).unwrap()].chars().count();
        for col in ["KEY", "STATUS", "PLAN", "NAME"] {
            let at = start(col);
            for line in &lines[1..] {
                let c: Vec<char> = line.chars().collect();
                assert!(
                    c[at] != ' ' && c[at - 1] == ' ',
                    "{col} in {line:?}\n{text}"
                );
            }
        }
        let end = lines[0].find("TIME LEFT").unwrap() + "TIME LEFT".len();
        let durations: Vec<String> = lines[1..]
            .iter()
            .map(|l| l.chars().take(end).collect::<String>())
            .collect();
        assert!(durations[0].ends_with(" 59 min 59 s"), "{text}");
        assert!(durations[1].ends_with(" −1.3 s"), "overdrawn: {text}");
        assert!(durations[2].ends_with(" 100 h"), "{text}");
        assert!(lines[2].starts_with("1234  "), "{text}");
        assert!(lines[1].starts_with("   7  "), "ids right-aligned: {text}");
    }
}
