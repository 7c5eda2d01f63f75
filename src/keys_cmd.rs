//! `tollgate keys …`: license management straight on the database file. A running gateway picks
//! the changes up within `storage.refresh_interval_ms`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use gateway::config::{checked_hours_ms, Config};
use gateway::ledger::now_ms;
use gateway::store::licenses::{self, Adjustment, License, NewLicense};
use gateway::store::{open_migrated, StoreError};
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
    let mut conn =
        open_migrated(path).with_context(|| format!("opening the database {}", path.display()))?;
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
            let (license, key) = licenses::create(&mut conn, &new, now_ms())?;
            print_with_key(&license, &key, json);
        }
        KeysCommand::List { json } => {
            let all = licenses::list(&conn)?;
            if json {
                let v: Vec<Value> = all.iter().map(License::to_json).collect();
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
                        licenses::ms_to_hours(l.balance_ms),
                        l.name
                    );
                }
            }
        }
        KeysCommand::Show { id, json } => {
            let l = licenses::get(&conn, id).map_err(not_found(id))?;
            print_license(&l, json);
        }
        KeysCommand::AddHours { id, hours, reason } => {
            let ms = parse_hours(hours)?;
            let reason = reason.unwrap_or_else(|| "cli".into());
            let l = licenses::adjust(
                &mut conn,
                id,
                Adjustment::Credit,
                ms,
                Some(&reason),
                now_ms(),
            )
            .map_err(not_found(id))?;
            println!(
                "license {id}: {hours} hour(s) added, {:.4} hour(s) remaining",
                licenses::ms_to_hours(l.balance_ms)
            );
        }
        KeysCommand::Revoke { id } => {
            licenses::revoke(&mut conn, id, now_ms()).map_err(not_found(id))?;
            println!("license {id}: revoked");
        }
        KeysCommand::Rotate { id, json } => {
            let (l, key) = licenses::rotate(&mut conn, id, now_ms()).map_err(not_found(id))?;
            print_with_key(&l, &key, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_with_key(l: &License, key: &str, json: bool) {
    if json {
        let mut v = l.to_json();
        v["license_key"] = key.into();
        println!("{v}");
    } else {
        print_license(l, false);
        println!("license_key:  {key}");
        println!("(shown once: store it now; only its hash is kept)");
    }
}

fn print_license(l: &License, json: bool) {
    let v = l.to_json();
    if json {
        println!("{v}");
        return;
    }
    if let Value::Object(map) = v {
        for (k, v) in map {
            let text = match v {
                Value::String(s) => s,
                Value::Null => "-".into(),
                v => v.to_string(),
            };
            println!("{:<13} {text}", format!("{k}:"));
        }
    }
}
