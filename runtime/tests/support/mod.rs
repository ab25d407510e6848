//! What the conformance suites share.

/// The NATS server `infra/up.sh` started, if it answers. When it does not, the case is skipped
/// with a loud line, unless `CONFAB_REQUIRE_SERVICES=1` (CI), where that fails the case.
pub async fn nats_url(what: &str) -> Option<String> {
    let url =
        std::env::var("CONFAB_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let address = url.trim_start_matches("nats://").to_owned();
    if tokio::net::TcpStream::connect(&address).await.is_err() {
        let required = std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "NATS is not reachable at {address}; infra/up.sh starts it"
        );
        eprintln!(
            "SKIPPED a NATS {what} case: NATS is not reachable at {address}; run infra/up.sh"
        );
        return None;
    }
    Some(url)
}
