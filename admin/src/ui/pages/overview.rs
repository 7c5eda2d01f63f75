//! The console's dashboard at `/`: the last 30 days of the whole gateway.

use axum::http::StatusCode;
use axum::response::Response;
use gateway::store::rollup::day_of;
use maud::html;

use crate::ui::charts::{day_chart, Unit};
use crate::ui::format::{money, percent, Time};
use crate::ui::layout::{page, stat, table};
use crate::ui::operator::{failed, Signed};
use crate::AdminState;

pub async fn dashboard(st: &AdminState, s: &Signed) -> Response {
    let now = st.app.ledger.now_ms();
    let store = &st.app.store;
    let read = tokio::try_join!(
        store.system_stats(30, now),
        store.system_daily(30, now),
        store.refused_since(now - 3_600_000, 20),
    );
    let (stats, daily, refused) = match read {
        Ok(v) => v,
        Err(e) => return failed(e.into()),
    };
    let revenue = if stats.revenue.is_empty() {
        "–".to_string()
    } else {
        stats
            .revenue
            .iter()
            .map(|(c, cents, _)| money(*cents, c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let today = day_of(now);
    let main = html! {
        h1 { "Dashboard" }
        p.lead { "The last 30 days." }
        div.stats {
            (stat("Active licenses", stats.active_licenses))
            (stat("Calls", stats.licensed_calls + stats.guest_calls))
            // of every call, licensed and guests alike (as the API's success_rate)
            (stat("Success rate", percent(
                stats.licensed_ok + stats.guest_ok,
                stats.licensed_calls + stats.guest_calls,
            )))
            (stat("Time charged", Time(stats.charged_ms)))
            @if stats.debited_ms != 0 {
                (stat("Deducted by hand", Time(stats.debited_ms)))
            }
            (stat("Revenue", revenue))
        }
        div.charts {
            (day_chart("sys-time", "Time charged per day", today, 30, &daily,
                |d| d.charged_ms, Unit::charged(&st.app.config.balance_unit)))
            (day_chart("sys-calls", "Calls per day", today, 30, &daily,
                |d| d.calls, Unit::Calls))
        }
        div.columns {
            section {
                h2 { "Top licenses" }
                @if stats.top_licenses.is_empty() {
                    p { "No usage in the last 30 days." }
                } @else {
                    div.table-wrap {
                        table {
                            thead {
                                tr {
                                    th scope="col" { "License" }
                                    th scope="col" { "Plan" }
                                    th.num scope="col" { "Time charged" }
                                    th.num scope="col" { "Requests" }
                                }
                            }
                            tbody {
                                @for (id, name, plan, ms, requests) in &stats.top_licenses {
                                    tr {
                                        td { a href={ "/console/licenses/" (id) } { (name) } }
                                        td { (plan) }
                                        td.num { (Time(*ms)) }
                                        td.num { (requests) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Plans" }
                (table(
                    &["Plan", "Licenses", "Active", "Time charged"],
                    &[false, true, true, true],
                    stats.plans.iter().map(|(plan, n, active, ms)| {
                        vec![
                            plan.as_str().into(),
                            n.to_string().into(),
                            active.to_string().into(),
                            Time(*ms).into(),
                        ]
                    }),
                    "No licenses yet.",
                ))
            }
        }
        section {
            h2 { "Refused without a valid key, last hour" }
            (table(
                &["Reason", "Client", "Requests"],
                &[false, false, true],
                refused.iter().map(|(reason, ip, n)| {
                    let ip = if ip.is_empty() { "other" } else { ip };
                    vec![reason.as_str().into(), ip.into(), n.to_string().into()]
                }),
                "None.",
            ))
        }
    };
    page(StatusCode::OK, "Dashboard", s.area("Dashboard"), main)
}
