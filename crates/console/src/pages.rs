//! Server-rendered HTML. Every value from outside (repositories, reasons,
//! logs) goes through [`esc`]. Pages are plain documents with real links,
//! buttons and forms, so they work without JavaScript and from a keyboard;
//! `console.js` only replaces the overview's live section as events arrive.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use sandfleet_ops::dlq::DeadLetter;
use sandfleet_proto::{Outcome, TaskResult};

use crate::auth::Principal;
use crate::fleet::{FairRow, Overview, Sessions};

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Which page is open, for the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// `/`
    Overview,
    /// `/results` and task pages.
    Results,
    /// `/dlq`
    Dlq,
    /// `/login`
    Login,
}

/// A whole page around `body`.
pub fn layout(title: &str, nav: Nav, who: Option<&Principal>, body: &str) -> String {
    let link = |n: Nav, href: &str, label: &str| {
        let current = if n == nav {
            r#" aria-current="page""#
        } else {
            ""
        };
        format!(r#"<a href="{href}"{current}>{label}</a>"#)
    };
    let account = match who {
        Some(p) => format!(
            r#"<span class="who">{} <small>({})</small></span>
<form method="post" action="/logout" class="inline"><button type="submit" class="link">Sign out</button></form>"#,
            esc(&p.name),
            if p.is_operator() {
                "operator"
            } else {
                "viewer"
            }
        ),
        None => link(Nav::Login, "/login", "Sign in"),
    };
    let refresh = if nav == Nav::Overview {
        // Without JavaScript the overview still refreshes itself.
        r#"<noscript><meta http-equiv="refresh" content="10"></noscript>"#
    } else {
        ""
    };
    format!(
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · sandfleet</title>
<link rel="stylesheet" href="/assets/console.css">
{refresh}
<script src="/assets/console.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header>
<nav aria-label="Main">
<strong class="brand">sandfleet</strong>
{}{}{}
<span class="spacer"></span>
{account}
</nav>
</header>
<main id="main">
{body}
</main>
</body>
</html>
"##,
        link(Nav::Overview, "/", "Overview"),
        link(Nav::Results, "/results", "Results"),
        link(Nav::Dlq, "/dlq", "Dead letters"),
        title = esc(title),
    )
}

fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - at).num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

fn outcome_badge(r: &TaskResult) -> String {
    let o = r.outcome.as_str();
    let class = if r.outcome.is_success() {
        "ok"
    } else if r.is_final {
        "bad"
    } else {
        "warn"
    };
    let state = if r.is_final { "" } else { " (retrying)" };
    format!(r#"<span class="badge {class}">{o}{state}</span>"#)
}

fn repo_of(r: &TaskResult) -> &str {
    r.source
        .as_ref()
        .map(|s| s.repository.as_str())
        .or_else(|| r.task.as_ref().map(|t| t.source.repository.as_str()))
        .unwrap_or("-")
}

/// A results table (overview's recent list and the results page).
pub fn results_table(results: &[TaskResult], caption: &str) -> String {
    if results.is_empty() {
        return format!(r#"<p class="empty">{}: none yet.</p>"#, esc(caption));
    }
    let mut s = format!(
        r#"<div class="scroll"><table class="results"><caption>{}</caption>
<thead><tr><th scope="col">Finished</th><th scope="col">Task</th><th scope="col">Attempt</th><th scope="col">Outcome</th><th scope="col">Exit</th><th scope="col">Repository</th><th scope="col">Reason</th></tr></thead><tbody>"#,
        esc(caption)
    );
    for r in results {
        let _ = write!(
            s,
            r#"<tr id="result-{id}-{att}" data-task="{id}"><td>{fin}</td><td><a href="/tasks/{id}"><code>{short}</code></a></td><td>{att}</td><td>{badge}</td><td>{exit}</td><td>{repo}</td><td>{err}</td></tr>"#,
            id = r.task_id,
            short = &r.task_id.to_string()[..13],
            att = r.attempt,
            fin = r.finished_at.format("%Y-%m-%d %H:%M:%S"),
            badge = outcome_badge(r),
            exit = r
                .exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            repo = esc(repo_of(r)),
            err = esc(r.error.as_deref().unwrap_or("")),
        );
    }
    s.push_str("</tbody></table></div>");
    s
}

/// The overview's live section: everything that changes. Sent whole in
/// each server-sent event and swapped in by `console.js`.
pub fn overview_live(o: &Overview) -> String {
    let now = Utc::now();
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<p class="stamp">Updated <time datetime="{}">{}</time> UTC</p>"#,
        o.at.to_rfc3339(),
        o.at.format("%H:%M:%S")
    );
    // Queues.
    s.push_str(
        r#"<section aria-labelledby="h-queues"><h2 id="h-queues">Queues</h2><div class="cards">"#,
    );
    for q in &o.queues {
        let value = match (q.ready, &q.error) {
            (Some(n), _) => n.to_string(),
            (None, Some(e)) => format!(r#"<span title="{}">?</span>"#, esc(e)),
            (None, None) => "?".into(),
        };
        let class = if q.role == "dead letters" && q.ready.unwrap_or(0) > 0 {
            " alert"
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<div class="card{class}" data-queue="{}"><span class="label">{}</span><span class="value">{value}</span><code class="qname">{}</code></div>"#,
            esc(&q.role),
            esc(&q.role),
            esc(&q.name)
        );
    }
    s.push_str("</div></section>");
    // In flight.
    s.push_str(r#"<section aria-labelledby="h-flight"><h2 id="h-flight">In flight</h2>"#);
    let running: Vec<_> = o
        .workers
        .iter()
        .flat_map(|w| w.running.iter().flatten().map(move |t| (w.url.as_str(), t)))
        .collect();
    if running.is_empty() {
        s.push_str(r#"<p class="empty">No task is running.</p>"#);
    } else {
        s.push_str(r#"<div class="scroll"><table><thead><tr><th scope="col">Task</th><th scope="col">Attempt</th><th scope="col">Sandbox</th><th scope="col">Repository</th><th scope="col">Running for</th><th scope="col">Worker</th></tr></thead><tbody>"#);
        for (url, t) in running {
            let _ = write!(
                s,
                r#"<tr id="inflight-{id}"><td><a href="/tasks/{id}"><code>{short}</code></a></td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                t.attempt,
                esc(&t.sandbox),
                esc(&t.repository),
                ago(t.started_at, now),
                esc(url),
                id = t.task_id,
                short = &t.task_id.to_string()[..13],
            );
        }
        s.push_str("</tbody></table></div>");
    }
    s.push_str("</section>");
    // Fair share, once a worker shares fairly.
    if !o.fair.is_empty() {
        s.push_str(&fair_share(&o.fair));
    }
    // Workers.
    s.push_str(r#"<section aria-labelledby="h-workers"><h2 id="h-workers">Workers</h2>"#);
    if o.workers.is_empty() {
        s.push_str(r#"<p class="empty">No worker endpoints configured (<code>console.workers</code>).</p>"#);
    } else {
        s.push_str(r#"<div class="scroll"><table><thead><tr><th scope="col">Worker</th><th scope="col">Ready</th><th scope="col">Breaker</th><th scope="col">In flight</th><th scope="col">Why not ready</th></tr></thead><tbody>"#);
        for w in &o.workers {
            let ready = match (w.ready, &w.error) {
                (Some(true), _) => r#"<span class="badge ok">ready</span>"#.to_owned(),
                (Some(false), _) => r#"<span class="badge bad">not ready</span>"#.to_owned(),
                (None, _) => r#"<span class="badge bad">unreachable</span>"#.to_owned(),
            };
            let breaker = w.breaker.as_deref().unwrap_or("-");
            let bclass = match breaker {
                "closed" => "ok",
                "half-open" => "warn",
                "open" => "bad",
                _ => "",
            };
            let why = w
                .error
                .iter()
                .chain(&w.reasons)
                .map(|r| esc(r))
                .collect::<Vec<_>>()
                .join("<br>");
            let _ = write!(
                s,
                r#"<tr class="worker"><td><code>{}</code></td><td>{ready}</td><td><span class="badge {bclass}">{}</span></td><td>{}</td><td>{why}</td></tr>"#,
                esc(&w.url),
                esc(breaker),
                w.in_flight
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
            );
        }
        s.push_str("</tbody></table></div>");
    }
    s.push_str("</section>");
    // Sessions, once a sessions service is configured.
    match &o.sessions {
        Sessions::NotConfigured => {}
        Sessions::Unavailable(e) => {
            let _ = write!(
                s,
                r#"<section aria-labelledby="h-sessions"><h2 id="h-sessions">Sessions</h2><p class="error">The sessions service did not answer: {}</p></section>"#,
                esc(e)
            );
        }
        Sessions::Listed {
            sessions: list,
            pools,
        } => {
            s.push_str(
                r#"<section aria-labelledby="h-sessions"><h2 id="h-sessions">Sessions</h2>"#,
            );
            if !pools.is_empty() {
                s.push_str(r#"<div class="scroll"><table class="pools"><caption>Warm pools</caption><thead><tr><th scope="col">Pool</th><th scope="col">Image</th><th scope="col">Idle / size</th><th scope="col">Warming</th><th scope="col">Claimed</th></tr></thead><tbody>"#);
                for p in pools {
                    let _ = write!(
                        s,
                        r#"<tr data-pool="{name}"><td>{name}</td><td><code>{}</code></td><td>{} / {}</td><td>{}</td><td>{}</td></tr>"#,
                        esc(&p.image),
                        p.idle,
                        p.size,
                        p.warming,
                        p.claimed,
                        name = esc(&p.name),
                    );
                }
                s.push_str("</tbody></table></div>");
            }
            if list.is_empty() {
                s.push_str(r#"<p class="empty">No session is open.</p>"#);
            } else {
                s.push_str(r#"<div class="scroll"><table><thead><tr><th scope="col">Session</th><th scope="col">Image</th><th scope="col">Created</th><th scope="col">State</th></tr></thead><tbody>"#);
                for x in list {
                    let _ = write!(
                        s,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(&x.id),
                        esc(&x.image),
                        esc(x.created.as_deref().unwrap_or("-")),
                        if x.ended { "ended" } else { "open" }
                    );
                }
                s.push_str("</tbody></table></div>");
            }
            s.push_str("</section>");
        }
    }
    // Recent results.
    s.push_str(r#"<section aria-labelledby="h-recent"><h2 id="h-recent">Latest results</h2>"#);
    s.push_str(&results_table(&o.recent, "The ten newest results"));
    s.push_str(r#"<p><a href="/results">All results</a></p></section>"#);
    s
}

/// The fair-share panel: per tenant (its keys summed), then each of its
/// keys, over every worker (`docs/fairness.md`).
fn fair_share(rows: &[FairRow]) -> String {
    let mut s = String::from(
        r#"<section aria-labelledby="h-fair"><h2 id="h-fair">Fair share</h2><div class="scroll"><table class="fair"><caption>Over every worker. Queued: held by the workers' schedulers (the backlog waits in the shards). Served: started.</caption>
<thead><tr><th scope="col">Tenant</th><th scope="col">Key</th><th scope="col">Queued</th><th scope="col">Running</th><th scope="col">Served</th></tr></thead><tbody>"#,
    );
    // Rows arrive ordered by tenant, then key.
    for tenant_rows in rows.chunk_by(|a, b| a.tenant == b.tenant) {
        let tenant = &tenant_rows[0].tenant;
        let sum = |f: fn(&FairRow) -> u64| tenant_rows.iter().map(f).sum::<u64>();
        let _ = write!(
            s,
            r#"<tr class="tenant" data-fair-tenant="{t}"><th scope="row">{t}</th><td>{n} key{plural}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            sum(|r| r.queued),
            sum(|r| r.running),
            sum(|r| r.served),
            t = esc(tenant),
            n = tenant_rows.len(),
            plural = if tenant_rows.len() == 1 { "" } else { "s" },
        );
        for r in tenant_rows {
            let _ = write!(
                s,
                r#"<tr class="key" data-fair-key="{k}"><td></td><td>{k}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                r.queued,
                r.running,
                r.served,
                k = esc(&r.key),
            );
        }
    }
    s.push_str("</tbody></table></div></section>");
    s
}

/// The overview page.
pub fn overview(o: &Overview, who: Option<&Principal>) -> String {
    let body = format!(
        r#"<h1>Overview</h1>
<div id="live" data-events="/events" aria-live="polite">{}</div>"#,
        overview_live(o)
    );
    layout("Overview", Nav::Overview, who, &body)
}

/// The filters of the results page and the replay form.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
pub struct ResultQuery {
    /// Repository pattern (`owner/name`, `owner/*`); empty: any.
    #[serde(default)]
    pub repo: String,
    /// Outcome name; empty: any (the replay form: any failure).
    #[serde(default)]
    pub outcome: String,
    /// Time window: `15m`, `1h`, `24h`, `7d`; empty: everything kept.
    #[serde(default)]
    pub window: String,
}

const WINDOWS: &[(&str, &str)] = &[
    ("", "everything kept"),
    ("15m", "last 15 minutes"),
    ("1h", "last hour"),
    ("24h", "last 24 hours"),
    ("7d", "last 7 days"),
];

fn select(name: &str, label: &str, current: &str, options: &[(&str, &str)]) -> String {
    let mut s = format!(r#"<label>{label} <select name="{name}">"#);
    for (value, text) in options {
        let sel = if *value == current { " selected" } else { "" };
        let _ = write!(s, r#"<option value="{value}"{sel}>{text}</option>"#);
    }
    s.push_str("</select></label>");
    s
}

/// The results page: filters, the replay form, the table.
pub fn results(
    q: &ResultQuery,
    rows: &[TaskResult],
    failed_matching: usize,
    who: Option<&Principal>,
    notice: Option<&str>,
) -> String {
    let mut outcomes = vec![("", "any")];
    outcomes.extend(Outcome::ALL.iter().map(|o| (o.as_str(), o.as_str())));
    let mut body = String::from("<h1>Results</h1>");
    if let Some(n) = notice {
        let _ = write!(body, r#"<p class="notice" role="status">{}</p>"#, esc(n));
    }
    let _ = write!(
        body,
        r#"<form method="get" action="/results" class="filters" role="search">
<label>Repository <input name="repo" value="{}" placeholder="owner/name or owner/*"></label>
{}{}
<button type="submit">Filter</button>
</form>"#,
        esc(&q.repo),
        select("outcome", "Outcome", &q.outcome, &outcomes),
        select("window", "Finished in", &q.window, WINDOWS),
    );
    let csrf = who.and_then(|p| p.csrf.as_deref()).unwrap_or("");
    let _ = write!(
        body,
        r#"<details class="replay"><summary>Replay the {failed_matching} failed builds these filters select</summary>
<form method="post" action="/replay">
<input type="hidden" name="csrf" value="{}">
<input type="hidden" name="repo" value="{}">
<input type="hidden" name="outcome" value="{}">
<input type="hidden" name="window" value="{}">
<p>Each failed build is sent once per batch, as the CLI's <code>sandfleet replay</code> does: a batch run twice sends nothing the second time.</p>
<label>Batch <input name="batch" required pattern="\S+" value="console-{}"></label>
<button type="submit" class="danger">Replay</button>
</form></details>"#,
        esc(csrf),
        esc(&q.repo),
        esc(&q.outcome),
        esc(&q.window),
        Utc::now().format("%Y%m%d-%H%M"),
    );
    body.push_str(&results_table(rows, "Results, newest first"));
    layout("Results", Nav::Results, who, &body)
}

/// One task's page: every attempt with its steps, log tail and reason.
pub fn task(id: &str, attempts: &[TaskResult], who: Option<&Principal>) -> String {
    let mut body = format!(r#"<h1>Task <code>{}</code></h1>"#, esc(id));
    if attempts.is_empty() {
        body.push_str(r#"<p class="empty">No result of this task has been read yet. A running task shows on the <a href="/">overview</a>.</p>"#);
        return layout("Task", Nav::Results, who, &body);
    }
    if let Some(t) = attempts.iter().rev().find_map(|r| r.task.as_deref()) {
        let _ = write!(
            body,
            r#"<dl class="facts"><dt>Repository</dt><dd>{}</dd><dt>Commit</dt><dd><code>{}</code></dd><dt>Image</dt><dd><code>{}</code></dd>{}</dl>"#,
            esc(&t.source.repository),
            esc(&t.source.commit),
            esc(&t.sandbox.image),
            t.replay_of
                .map(|o| format!(
                    r#"<dt>Replay of</dt><dd><a href="/tasks/{o}"><code>{o}</code></a></dd>"#
                ))
                .unwrap_or_default(),
        );
    }
    for r in attempts {
        let _ = write!(
            body,
            r#"<section class="attempt" id="attempt-{att}-{fin}" aria-labelledby="h-att-{att}-{fin}"><h2 id="h-att-{att}-{fin}">Attempt {att} {badge}</h2>
<dl class="facts"><dt>Finished</dt><dd>{finished}</dd><dt>Worker</dt><dd>{worker}</dd><dt>Sandbox</dt><dd><code>{sandbox}</code></dd><dt>Exit code</dt><dd>{exit}</dd></dl>"#,
            att = r.attempt,
            fin = if r.is_final { "final" } else { "retrying" },
            badge = outcome_badge(r),
            finished = r.finished_at.format("%Y-%m-%d %H:%M:%S UTC"),
            worker = esc(&r.worker),
            sandbox = esc(r.sandbox.as_deref().unwrap_or("-")),
            exit = r
                .exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        );
        if let Some(e) = &r.error {
            let _ = write!(
                body,
                r#"<p class="reason"><strong>Reason:</strong> {}</p>"#,
                esc(e)
            );
        }
        if !r.steps.is_empty() {
            body.push_str(r#"<div class="scroll"><table class="steps"><caption>Steps</caption><thead><tr><th scope="col">Step</th><th scope="col">Exit code</th><th scope="col">Duration</th><th scope="col">Note</th></tr></thead><tbody>"#);
            for st in &r.steps {
                let note = if st.timed_out {
                    "timed out"
                } else if st.skipped {
                    "skipped"
                } else {
                    ""
                };
                let _ = write!(
                    body,
                    r#"<tr class="step" data-step="{name}"><td>{name}</td><td class="exit">{exit}</td><td>{dur:.1} s</td><td>{note}</td></tr>"#,
                    name = esc(&st.name),
                    exit = st
                        .exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    dur = st.duration_ms as f64 / 1000.0,
                );
            }
            body.push_str("</tbody></table></div>");
        }
        let trunc = if r.log_truncated {
            " (truncated: the start is cut)"
        } else {
            ""
        };
        let _ = write!(
            body,
            r#"<h3>Log tail{trunc}</h3><pre class="log" tabindex="0">{}</pre></section>"#,
            esc(&r.log_tail)
        );
    }
    layout("Task", Nav::Results, who, &body)
}

/// The dead letters page.
pub fn dlq(
    queue: &str,
    letters: &[DeadLetter],
    who: Option<&Principal>,
    notice: Option<&str>,
) -> String {
    let csrf = esc(who.and_then(|p| p.csrf.as_deref()).unwrap_or(""));
    let mut body = format!(
        r#"<h1>Dead letters</h1><p>Queue <code>{}</code>: {} message(s).</p>"#,
        esc(queue),
        letters.len()
    );
    if let Some(n) = notice {
        let _ = write!(body, r#"<p class="notice" role="status">{}</p>"#, esc(n));
    }
    if letters.is_empty() {
        body.push_str(r#"<p class="empty">Nothing is dead-lettered.</p>"#);
        return layout("Dead letters", Nav::Dlq, who, &body);
    }
    let _ = write!(
        body,
        r#"<form method="post" action="/dlq/requeue" id="requeue-form">
<input type="hidden" name="csrf" value="{csrf}">
<div class="scroll"><table class="dlq"><caption>Select the letters to requeue; each goes back as one more attempt under the same id.</caption>
<thead><tr><th scope="col">Select</th><th scope="col">Task</th><th scope="col">Code</th><th scope="col">Attempt</th><th scope="col">Repository</th><th scope="col">Reason</th></tr></thead><tbody>"#
    );
    for (i, d) in letters.iter().enumerate() {
        let _ = write!(
            body,
            r#"<tr id="dlq-{h}"><td><input type="checkbox" name="task" value="{h}" id="sel-{i}" aria-label="select {h}"></td><td><label for="sel-{i}"><code>{h}</code></label></td><td>{code}</td><td>{att}</td><td>{repo}</td><td>{reason}</td></tr>"#,
            h = esc(&d.handle),
            code = esc(d.code.as_deref().unwrap_or("-")),
            att = d
                .attempt
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            repo = esc(d.repository.as_deref().unwrap_or("-")),
            reason = esc(d.reason.as_deref().unwrap_or("-")),
        );
    }
    body.push_str(
        r#"</tbody></table></div>
<div class="actions"><button type="submit" name="which" value="selected">Requeue selected</button>
<button type="submit" name="which" value="all">Requeue all</button></div>
</form>"#,
    );
    let _ = write!(
        body,
        r#"<details class="purge"><summary>Purge the dead-letter queue</summary>
<form method="post" action="/dlq/purge">
<input type="hidden" name="csrf" value="{csrf}">
<p>This deletes every dead letter for good. Type <kbd>purge</kbd> to confirm.</p>
<label>Confirmation <input name="confirm" autocomplete="off" required></label>
<button type="submit" class="danger">Purge</button>
</form></details>"#
    );
    layout("Dead letters", Nav::Dlq, who, &body)
}

/// The sign-in page.
pub fn login(message: Option<&str>, next: &str) -> String {
    let msg = message
        .map(|m| format!(r#"<p class="error" role="alert">{}</p>"#, esc(m)))
        .unwrap_or_default();
    let body = format!(
        r#"<h1>Sign in</h1>{msg}
<form method="post" action="/login" class="login">
<input type="hidden" name="next" value="{}">
<label>Token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
<button type="submit">Sign in</button>
</form>
<p>Tokens and their roles are set in the <code>console</code> section of the settings. A viewer token reads; an operator token also requeues, purges and replays.</p>"#,
        esc(next)
    );
    layout("Sign in", Nav::Login, None, &body)
}

/// A page that explains a refusal or an error.
pub fn message(title: &str, text: &str, who: Option<&Principal>) -> String {
    let body = format!(
        r#"<h1>{}</h1><p class="error" role="alert">{}</p><p><a href="/login">Sign in</a> · <a href="/">Overview</a></p>"#,
        esc(title),
        esc(text)
    );
    layout(title, Nav::Overview, who, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_filter_offers_every_outcome_and_keeps_the_choice() {
        let q = ResultQuery {
            repo: "acme/<b>".into(),
            outcome: "timed_out".into(),
            window: "1h".into(),
        };
        let page = results(&q, &[], 0, None, None);
        for o in Outcome::ALL {
            assert!(
                page.contains(&format!(r#"value="{}""#, o.as_str())),
                "{o:?}"
            );
        }
        assert!(page.contains(r#"<option value="timed_out" selected>"#));
        assert!(page.contains(r#"<option value="1h" selected>"#));
        assert!(page.contains("acme/&lt;b&gt;") && !page.contains("acme/<b>"));
    }

    #[test]
    fn the_fair_share_panel_sums_each_tenant_over_its_keys() {
        let row = |t: &str, k: &str, q, r, n| FairRow {
            tenant: t.into(),
            key: k.into(),
            queued: q,
            running: r,
            served: n,
        };
        let mut o = Overview {
            at: Utc::now(),
            queues: Vec::new(),
            workers: Vec::new(),
            sessions: Sessions::NotConfigured,
            fair: Vec::new(),
            recent: Vec::new(),
        };
        assert!(
            !overview_live(&o).contains("Fair share"),
            "no panel without fair sharing"
        );
        o.fair = vec![
            row("acme", "acme/<api>", 1, 2, 30),
            row("acme", "acme/web", 2, 3, 12),
            row("zeta", "zeta/app", 0, 1, 5),
        ];
        let page = overview_live(&o);
        assert!(page.contains(
            r#"<tr class="tenant" data-fair-tenant="acme"><th scope="row">acme</th><td>2 keys</td><td>3</td><td>5</td><td>42</td></tr>"#
        ), "{page}");
        assert!(page.contains(
            r#"<tr class="key" data-fair-key="acme/&lt;api&gt;"><td></td><td>acme/&lt;api&gt;</td><td>1</td><td>2</td><td>30</td></tr>"#
        ));
        assert!(
            page.contains(r#"data-fair-tenant="zeta"><th scope="row">zeta</th><td>1 key</td>"#)
        );
    }

    #[test]
    fn text_from_outside_cannot_become_markup() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
    }
}
