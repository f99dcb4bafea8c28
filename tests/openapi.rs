//! The admin API's generated OpenAPI document against live responses: a schema-driven
//! fuzzer (schemathesis, bounded in examples and time) finds no response that breaks it.
//! That the document lists exactly the router's operations is
//! `admin_api::the_openapi_document_and_the_router_agree`.

mod support;

use std::process::Command;

use support::*;

fn config(legacy: &Backend, target: &Backend) -> String {
    users_route(
        &legacy.url(),
        &target.url(),
        "{ percentage: { weight: 0 } }",
        "    rollout:\n      steps: [10, 50, 100]\n      bake: 1h\n",
    ) + "flags:\n  new-search: { percentage: 0 }\n"
}

/// schemathesis, or `None` when it is not installed and cannot be.
fn schemathesis() -> Option<String> {
    let found = || {
        Command::new("schemathesis")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !found() {
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "schemathesis"])
            .status();
    }
    found().then(|| "schemathesis".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_response_that_breaks_the_document() {
    let Some(tool) = schemathesis() else {
        eprintln!(
            "SKIPPED: schemathesis is not installed and `pip install schemathesis` failed; \
             .ci/run installs it"
        );
        return;
    };
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&config(&legacy, &target));
    let dir = tempfile::tempdir().unwrap();
    // A change that is valid JSON but not possible as asked (wrong split kind, a rollout
    // state that forbids it, a stale ETag) is refused by design with 409, 412 or 422.
    std::fs::write(
        dir.path().join("schemathesis.toml"),
        "[checks.positive_data_acceptance]\n\
         expected-statuses = [\"2xx\", \"401\", \"404\", \"409\", \"412\", \"422\"]\n",
    )
    .unwrap();
    let output = Command::new(tool)
        .current_dir(dir.path())
        .args(["run", &proxy.admin_url("/v1/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "15",
            "--seed",
            "7",
            "--workers",
            "1",
        ])
        .args(["--no-shrink", "--request-timeout", "10", "--max-time", "60"])
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found responses that break the document:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
}
