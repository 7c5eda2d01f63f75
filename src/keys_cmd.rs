//! `tollgate keys …`: license management straight on the database file. A running gateway picks
//! the changes up within `storage.refresh_interval_ms`.

use std::process::ExitCode;

use admin::views;
use anyhow::{bail, Context};
use clap::Subcommand;
use gateway::config::{checked_hours_ms, Config};
use gateway::ledger::now_ms;
use gateway::license::ms_to_hours;
use gateway::store::{Adjustment, License, NewLicense, StoreError};
use serde_json::Value;

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
    /// Revoke a license: its key stops working.
    Revoke { id: i64 },
    /// Replace a license's key: the old key stops working, the new one is printed once.
    Rotate {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

/// Hours typed by a person, as whole milliseconds.
pub fn parse_hours(hours: f64) -> anyhow::Result<i64> {
    checked_hours_ms(hours).map_err(anyhow::Error::msg)
}

pub fn run(config: &Config, command: KeysCommand) -> anyhow::Result<ExitCode> {
    let path = &config.storage.path;
    let store = gateway::store::open_sqlite(path)
        .with_context(|| format!("opening the database {}", path.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let not_found = |id: i64| {
        move |e: StoreError| match e {
            StoreError::NotFound => anyhow::anyhow!("no license with id {id}"),
            e => e.into(),
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
            if config.plan(&plan).is_none() {
                let names: Vec<&str> = config.plans.iter().map(|p| p.name.as_str()).collect();
                bail!(
                    "no plan named {plan:?}; configured plans: {}",
                    names.join(", ")
                );
            }
            let new = NewLicense {
                name,
                email,
                company,
                plan,
                balance_ms: parse_hours(hours)?,
                expires_at: None,
            };
            let (license, key) = rt.block_on(store.create_license(new, now_ms()))?;
            print_with_key(&license, &key, json);
        }
        KeysCommand::List { json } => {
            let all = rt.block_on(store.all_licenses())?;
            if json {
                let v: Vec<Value> = all.iter().map(views::license).collect();
                println!("{}", Value::Array(v));
            } else {
                println!(
                    "{:>6}  {:<10}  {:<8}  {:<10}  {:>12}  NAME",
                    "ID", "KEY", "STATUS", "PLAN", "HOURS LEFT"
                );
                for l in &all {
                    println!(
                        "{:>6}  {:<10}  {:<8}  {:<10}  {:>12.4}  {}",
                        l.id,
                        format!("{}…", l.key_prefix),
                        l.status.as_str(),
                        l.plan,
                        ms_to_hours(l.balance_ms),
                        l.name
                    );
                }
            }
        }
        KeysCommand::Show { id, json } => {
            let l = rt.block_on(store.license(id)).map_err(not_found(id))?;
            print_license(&l, json);
        }
        KeysCommand::AddHours { id, hours, reason } => {
            let ms = parse_hours(hours)?;
            let reason = reason.unwrap_or_else(|| "cli".into());
            let credit = store.adjust_balance(id, Adjustment::Credit, ms, Some(reason), now_ms());
            let l = rt.block_on(credit).map_err(not_found(id))?;
            println!(
                "license {id}: {hours} hour(s) added, {:.4} hour(s) remaining",
                ms_to_hours(l.balance_ms)
            );
        }
        KeysCommand::Revoke { id } => {
            rt.block_on(store.revoke(id, now_ms()))
                .map_err(not_found(id))?;
            println!("license {id}: revoked");
        }
        KeysCommand::Rotate { id, json } => {
            let (l, key) = rt
                .block_on(store.rotate(id, now_ms()))
                .map_err(not_found(id))?;
            print_with_key(&l, &key, json);
        }
    }
    store.close();
    Ok(ExitCode::SUCCESS)
}

fn print_with_key(l: &License, key: &str, json: bool) {
    if json {
        let mut v = views::license(l);
        v["license_key"] = key.into();
        println!("{v}");
    } else {
        print!("{}", fields(l, Some(key)));
        println!("(shown once: store it now; only its hash is kept)");
    }
}

fn print_license(l: &License, json: bool) {
    if json {
        println!("{}", views::license(l));
    } else {
        print!("{}", fields(l, None));
    }
}

/// A license as `name: value` lines, the values in one column however long the names.
fn fields(l: &License, key: Option<&str>) -> String {
    let Value::Object(map) = views::license(l) else {
        return String::new();
    };
    let mut rows: Vec<(String, String)> = map
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s,
                Value::Null => "-".into(),
                v => v.to_string(),
            };
            (k, text)
        })
        .collect();
    if let Some(key) = key {
        rows.push(("license_key".into(), key.into()));
    }
    let width = rows.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_of_keys_show_starts_in_one_column() {
        let l = License {
            id: 7,
            key_hash: gateway::keys::KeyHash([0; 32]),
            key_prefix: "tg_abc".into(),
            name: "Ada".into(),
            email: None,
            company: None,
            plan: "free".into(),
            status: gateway::license::LicenseStatus::Active,
            balance_ms: 3_600_000,
            used_ms: 0,
            requests_total: 0,
            version: 1,
            expires_at: None,
            created_at: 0,
            updated_at: 0,
            last_used_at: None,
        };
        let text = fields(&l, Some("tg_secret"));
        let columns: Vec<usize> = text
            .lines()
            .map(|line| {
                let colon = line.find(':').unwrap();
                colon + line[colon + 1..].find(|c: char| c != ' ').unwrap() + 1
            })
            .collect();
        assert!(text.contains("seconds_remaining:"), "{text}");
        assert!(columns.windows(2).all(|w| w[0] == w[1]), "{text}");
    }
}
