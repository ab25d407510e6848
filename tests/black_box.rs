//! Black-box tests: the real `confab` binary, started as a user or an operator would start it.
//! The embedded default (`confab serve` + `confab dev-token`), and the distributed deployment
//! (`confab migrate`, then `confab api`, `confab notifier` and `confab ws-plexer` as three processes)
//! against the Cassandra, NATS and Keycloak that `infra/up.sh` started.

mod support;

use serde_json::{Value, json};
use support::{ConfabProcess, SseStream};

async fn dev_token(dir: &std::path::Path, user: &str) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["dev-token", user])
        .current_dir(dir)
        .env_remove("CONFAB_IDENTITY__MODE")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "dev-token: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The flow a client runs: provision, create a chat, listen, send, receive, read history.
async fn run_flow(api: &str, notifier: &str, alice: &str, bob: &str) {
    let http = reqwest::Client::new();
    let bob_id = http
        .get(format!("{api}/v1/me"))
        .bearer_auth(bob)
        .send()
        .await
        .unwrap();
    assert_eq!(bob_id.status(), 200);
    let bob_id = bob_id.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let chat = http
        .post(format!("{api}/v1/chats"))
        .bearer_auth(alice)
        .json(&json!({"kind": "group", "name": "black box", "members": [bob_id]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 201);
    let chat = chat.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let ticket: Value = http
        .post(format!("{notifier}/v1/events/ticket"))
        .bearer_auth(bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut events = SseStream::open(http.get(format!(
        "{notifier}/v1/events?ticket={}",
        ticket["ticket"].as_str().unwrap()
    )))
    .await;

    let sent = http
        .post(format!("{api}/v1/chats/{chat}/signals"))
        .bearer_auth(alice)
        .json(&json!({"kind": "message", "nonce": "bb-1", "text": "hello from outside"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 201);
    let sent: Value = sent.json().await.unwrap();

    let event = events.next_of("signal.created").await;
    assert_eq!(event.data["data"], sent);

    let history: Value = http
        .get(format!("{api}/v1/chats/{chat}/signals?limit=50"))
        .bearer_auth(bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["items"], json!([sent]));
}

#[tokio::test]
async fn confab_serve_runs_the_flow_on_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![("CONFAB_API__LISTEN".to_owned(), "127.0.0.1:0".to_owned())];
    let serve = ConfabProcess::start(&["serve"], &env, dir.path()).await;
    let alice = dev_token(dir.path(), "alice").await;
    let bob = dev_token(dir.path(), "bob").await;
    run_flow(&serve.base, &serve.base, &alice, &bob).await;

    let ready: Value = reqwest::get(format!("{}/ready", serve.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    let metrics = reqwest::get(format!("{}/metrics", serve.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("confab_http_requests_total"), "{metrics}");
    serve.terminate().await;

    // The data survives a restart.
    let again = ConfabProcess::start(&["serve"], &env, dir.path()).await;
    let me = reqwest::Client::new()
        .get(format!("{}/v1/me", again.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    again.terminate().await;
}

#[tokio::test]
async fn dev_identity_refuses_non_loopback_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("serve")
        .current_dir(dir.path())
        .env("CONFAB_API__LISTEN", "0.0.0.0:0")
        .env_remove("CONFAB_IDENTITY__MODE")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("loopback"));
}

#[tokio::test]
async fn distributed_services_run_the_flow_on_the_real_stack() {
    if !support::real_stack_available("distributed_services_run_the_flow_on_the_real_stack").await {
        return;
    }
    // The API refuses to start on an unmigrated keyspace; `confab migrate` prepares it (the
    // deployment ran it once), twice safely.
    let deployment = support::Deployment::new("bb").await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("migrate")
        .current_dir(deployment.dir.path())
        .envs(deployment.env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "migrate again: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let api = deployment.start("api", &[]).await;
    let notifier = deployment.start("notifier", &[]).await;
    let plexer = deployment.start("ws-plexer", &[]).await;
    let alice = support::keycloak_token("alice", "alice").await;
    let bob = support::keycloak_token("bob", "bob").await;
    run_flow(&api.base, &notifier.base, &alice, &bob).await;

    // Each service serves only its own routes.
    let on_notifier = reqwest::Client::new()
        .get(format!("{}/v1/me", notifier.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(on_notifier.status(), 404);

    // The api serves the web client, which signs in at the identity provider (no dev sign-in).
    let page = reqwest::get(format!("{}/", api.base)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<script"));
    let web_config: Value = reqwest::get(format!("{}/config.json", api.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(web_config["sign_in"], "oidc");
    assert_eq!(web_config["issuer"], support::oidc_issuer());
    let dev_sign_in = reqwest::Client::new()
        .post(format!("{}/v1/dev/sign-in", api.base))
        .json(&json!({"username": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dev_sign_in.status(), 404);

    api.terminate().await;
    notifier.terminate().await;
    plexer.terminate().await;
    deployment.clean_up().await;
}

/// Send parity across processes: retries of one nonce race through two `confab api` processes on
/// one Cassandra and one NATS. Each round stores one signal; exactly one request gets 201 and every
/// other gets 200 with that same signal.
#[tokio::test]
async fn two_api_processes_racing_one_nonce_store_one_signal() {
    if !support::real_stack_available("two_api_processes_racing_one_nonce_store_one_signal").await {
        return;
    }
    let deployment = support::Deployment::new("race").await;
    let first = deployment.start("api", &[]).await;
    let second = deployment.start("api", &[]).await;
    let alice = support::keycloak_token("alice", "alice").await;
    let bob = support::keycloak_token("bob", "bob").await;
    let http = reqwest::Client::new();
    let bob_id: Value = http
        .get(format!("{}/v1/me", first.base))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat: Value = http
        .post(format!("{}/v1/chats", first.base))
        .bearer_auth(&alice)
        .json(&json!({"kind": "group", "name": "race", "members": [bob_id["id"]]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat = chat["id"].as_str().unwrap().to_owned();

    const ROUNDS: usize = 5;
    const RACERS: usize = 12;
    for round in 0..ROUNDS {
        let nonce = format!("raced-{round}-{}", support::unique(""));
        let racers = (0..RACERS).map(|i| {
            let base = if i % 2 == 0 {
                &first.base
            } else {
                &second.base
            };
            http.post(format!("{base}/v1/chats/{chat}/signals"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "message", "nonce": nonce, "text": format!("attempt {i}")}))
                .send()
        });
        let mut created = 0;
        let mut ids = std::collections::HashSet::new();
        for response in futures::future::join_all(racers).await {
            let response = response.unwrap();
            let status = response.status().as_u16();
            assert!(status == 201 || status == 200, "status {status}");
            if status == 201 {
                created += 1;
            }
            let signal: Value = response.json().await.unwrap();
            ids.insert(signal["id"].as_str().unwrap().to_owned());
        }
        assert_eq!(created, 1, "round {round}: one 201");
        assert_eq!(
            ids.len(),
            1,
            "round {round}: every racer got the same signal"
        );
    }
    let history: Value = http
        .get(format!("{}/v1/chats/{chat}/signals?limit=100", second.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["items"].as_array().unwrap().len(), ROUNDS);

    first.terminate().await;
    second.terminate().await;
    deployment.clean_up().await;
}
