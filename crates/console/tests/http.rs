//! The HTTP layer without a browser: who may act, CSRF, Origin, cookies,
//! token-protected reading. Runs against a real console on the real broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, OPERATOR, VIEWER};
use reqwest::header::{AUTHORIZATION, COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use reqwest::redirect::Policy;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Signs in; returns the cookie pair and the page's CSRF token.
async fn sign_in(env: &Env, token: &str) -> (String, String) {
    let c = client();
    let resp = c
        .post(env.url("/login"))
        .header(ORIGIN, format!("http://{}", env.console))
        .form(&[("token", token), ("next", "/dlq")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()[LOCATION], "/dlq");
    let set = resp.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    let pair = set.split(';').next().unwrap().to_owned();
    // Any page with a form carries the session's CSRF token.
    let page = c
        .get(env.url("/results"))
        .header(COOKIE, &pair)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = page.find(r#"name="csrf" value=""#).unwrap() + r#"name="csrf" value=""#.len();
    let csrf = page[at..at + 64].to_owned();
    (pair, csrf)
}

#[tokio::test]
async fn actions_need_an_operator_token_and_a_same_site_form() {
    let env = Env::start(false, false).await;
    let c = client();
    let purge = |form: Vec<(&'static str, String)>| c.post(env.url("/dlq/purge")).form(&form);

    // Reading is open in this configuration.
    assert_eq!(c.get(env.url("/")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(env.url("/dlq")).send().await.unwrap().status(), 200);

    // Nobody signed in: refused.
    let r = purge(vec![("confirm", "purge".into())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("operator token"));

    // A viewer: refused, and told why.
    let (viewer, vcsrf) = sign_in(&env, VIEWER).await;
    let r = purge(vec![("confirm", "purge".into()), ("csrf", vcsrf)])
        .header(COOKIE, &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("viewer role"));
    let r = purge(vec![("confirm", "purge".into())])
        .header(AUTHORIZATION, format!("Bearer {VIEWER}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // An operator session without the CSRF token, with another session's
    // token, or from another site: refused.
    let (op, csrf) = sign_in(&env, OPERATOR).await;
    let (_, other_csrf) = sign_in(&env, OPERATOR).await;
    for form in [
        vec![("confirm", "purge".to_owned())],
        vec![
            ("confirm", "purge".to_owned()),
            ("csrf", other_csrf.clone()),
        ],
    ] {
        let r = purge(form).header(COOKIE, &op).send().await.unwrap();
        assert_eq!(r.status(), 403);
        assert!(r.text().await.unwrap().contains("CSRF"));
    }
    let r = purge(vec![("confirm", "purge".into()), ("csrf", csrf.clone())])
        .header(COOKIE, &op)
        .header(ORIGIN, "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("cross-site"));
    // Nor may another site sign a browser in.
    let r = c
        .post(env.url("/login"))
        .header(ORIGIN, "https://evil.example")
        .form(&[("token", OPERATOR)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get(SET_COOKIE).is_none());

    // The operator's own form: accepted (purge needs its confirmation).
    let r = purge(vec![("confirm", "no".into()), ("csrf", csrf.clone())])
        .header(COOKIE, &op)
        .header(ORIGIN, format!("http://{}", env.console))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Not purged"));
    let r = purge(vec![("confirm", "purge".into()), ("csrf", csrf)])
        .header(COOKIE, &op)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Purged 0 dead letter(s)."));
    // A script with the operator token as a bearer: no cookie, no CSRF.
    let r = purge(vec![("confirm", "purge".into())])
        .header(AUTHORIZATION, format!("Bearer {OPERATOR}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Signing out ends the session.
    let r = c
        .post(env.url("/logout"))
        .header(COOKIE, &op)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = purge(vec![("confirm", "purge".into())])
        .header(COOKIE, &op)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    env.cleanup().await;
}

#[tokio::test]
async fn reading_can_require_a_token() {
    let env = Env::start(false, true).await;
    let c = client();
    for path in ["/", "/results", "/dlq"] {
        let r = c.get(env.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 303, "{path}");
        assert!(
            r.headers()[LOCATION]
                .to_str()
                .unwrap()
                .starts_with("/login?next="),
            "{path}"
        );
    }
    assert_eq!(
        c.get(env.url("/events")).send().await.unwrap().status(),
        401
    );
    // The sign-in page and the assets stay open.
    assert_eq!(c.get(env.url("/login")).send().await.unwrap().status(), 200);
    let css = c.get(env.url("/assets/console.css")).send().await.unwrap();
    assert_eq!(css.status(), 200);
    // A viewer reads.
    let r = c
        .get(env.url("/"))
        .header(AUTHORIZATION, format!("Bearer {VIEWER}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let (cookie, _) = sign_in(&env, VIEWER).await;
    let r = c
        .get(env.url("/dlq"))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A wrong token does not.
    let r = c
        .get(env.url("/"))
        .header(AUTHORIZATION, "Bearer not-a-token-at-all-really")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    env.cleanup().await;
}

/// Waits until the console has read `n` results of `repo`.
async fn results_read(env: &Env, c: &reqwest::Client, task: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let page = c
            .get(env.url("/results"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if page.contains(task) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the console never read the result of {task}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn replay_sends_each_failed_build_once_per_batch_like_the_cli() {
    let env = Env::start(false, false).await;
    let c = client();
    let failed = common::task("acme/replayed", &[("test", "exit 2")]);
    let other = common::task("someone/else", &[("test", "exit 2")]);
    env.publish_result(&common::failed_result(&failed)).await;
    env.publish_result(&common::failed_result(&other)).await;
    results_read(&env, &c, &failed.id.to_string()).await;
    results_read(&env, &c, &other.id.to_string()).await;

    let replay = |batch: &'static str| {
        c.post(env.url("/replay"))
            .header(AUTHORIZATION, format!("Bearer {OPERATOR}"))
            .form(&[
                ("batch", batch),
                ("repo", "acme/*"),
                ("outcome", ""),
                ("window", "1h"),
            ])
    };
    let page = replay("incident-7")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Batch incident-7: 1 sent, 0 already replayed in this batch, 0 failed."),
        "{page}"
    );
    // The same batch again: nothing is sent twice.
    let page = replay("incident-7")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Batch incident-7: 0 sent, 1 already replayed in this batch, 0 failed."),
        "{page}"
    );
    // One replayed task waits in the tasks queue, a new id pointing at the
    // original build.
    let letters = {
        let d = sandfleet_ops::dlq::read(&env.amqp, &env.topology.tasks_queue, 10)
            .await
            .unwrap();
        let tasks: Vec<sandfleet_proto::Task> = d
            .iter()
            .map(|d| serde_json::from_slice(d.body()).unwrap())
            .collect();
        sandfleet_ops::dlq::give_back(&d).await;
        tasks
    };
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].replay_of, Some(failed.id));
    assert_ne!(letters[0].id, failed.id);
    assert_eq!(
        letters[0].idempotency_key,
        sandfleet_ops::replay::replay_key(failed.id, "incident-7")
    );
    // A viewer may not replay.
    let r = c
        .post(env.url("/replay"))
        .header(AUTHORIZATION, format!("Bearer {VIEWER}"))
        .form(&[("batch", "other")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    env.cleanup().await;
}

#[tokio::test]
async fn requeue_all_empties_the_dead_letters_into_the_task_queue() {
    let env = Env::start(false, false).await;
    let c = client();
    let a = common::task("acme/a", &[("test", "true")]);
    let b = common::task("acme/b", &[("test", "true")]);
    env.dead_letter(&a, "max_attempts", "gave up").await;
    env.dead_letter(&b, "max_attempts", "gave up").await;
    // Nothing selected and not "all": nothing happens, and the page says why.
    let page = c
        .post(env.url("/dlq/requeue"))
        .header(AUTHORIZATION, format!("Bearer {OPERATOR}"))
        .form(&[("which", "selected")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Select at least one dead letter"), "{page}");
    assert!(page.contains(&format!("id=\"dlq-{}\"", a.id)), "{page}");
    assert!(page.contains(&format!("id=\"dlq-{}\"", b.id)), "{page}");

    let page = c
        .post(env.url("/dlq/requeue"))
        .header(AUTHORIZATION, format!("Bearer {OPERATOR}"))
        .form(&[("which", "all")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("2 requeued, 0 failed."), "{page}");
    assert!(page.contains("Nothing is dead-lettered."), "{page}");
    // Both wait in the task queue as their fourth attempt.
    let held = sandfleet_ops::dlq::read(&env.amqp, &env.topology.tasks_queue, 10)
        .await
        .unwrap();
    let mut got: Vec<(String, Option<u32>)> = held
        .iter()
        .map(|d| (d.message_id().unwrap().to_owned(), d.attempt()))
        .collect();
    sandfleet_ops::dlq::give_back(&held).await;
    got.sort();
    let mut want = vec![(a.id.to_string(), Some(4)), (b.id.to_string(), Some(4))];
    want.sort();
    assert_eq!(got, want);
    env.cleanup().await;
}
