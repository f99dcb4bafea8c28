//! The README's walkthrough works when pasted: its shell block runs as written (with free
//! ports in place of the ones it names, and this build's `switchyard` on PATH) and prints what
//! the README says it prints.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The first ```sh block after `heading` in README.md.
fn block_after(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find(heading).expect("heading in README")..];
    let start = section.find("```sh\n").expect("a sh block") + 6;
    let end = section[start..].find("\n```").unwrap();
    section[start..start + end].to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn first_migration_walkthrough_runs_as_written() {
    let mut script = block_after("## Your first migration, step by step");
    for port in ["8080", "9901", "9001", "9002"] {
        assert!(script.contains(port), "the walkthrough names port {port}");
        script = script.replace(port, &free_port().to_string());
    }
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_switchyard"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dir = tempfile::tempdir().unwrap();
    // Output to files, not pipes: the walkthrough's background servers would hold a pipe open.
    let stdout_path = dir.path().join("stdout.txt");
    let stderr_path = dir.path().join("stderr.txt");
    let mut child = Command::new("timeout")
        .args(["180", "bash", "-e", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("SWITCHYARD_ADMIN_URL")
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("run bash");
    let status = child.wait().unwrap();
    // Whatever the script left running when it failed (servers started with `&`).
    let _ = Command::new("kill")
        .args(["-TERM", &format!("-{}", child.id())])
        .status();
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        status.success(),
        "walkthrough failed ({status:?})\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let expect_in_order = [
        "config ok",
        "users from the monolith",
        "promoted",
        "users from users-v2",
        "rolled_back",
    ];
    let mut rest: &str = &stdout;
    for words in expect_in_order {
        let at = rest
            .find(words)
            .unwrap_or_else(|| panic!("`{words}` missing or out of order in:\n{stdout}\n{stderr}"));
        rest = &rest[at + words.len()..];
    }
    assert!(
        stdout.contains("walkthrough"),
        "the audit log shows the reason:\n{stdout}"
    );
}
