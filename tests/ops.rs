//! Operations files: the systemd units pass `systemd-analyze verify` and the hardening
//! score check of `scripts/verify-systemd.sh`; the RabbitMQ set-up script grants the server
//! user exactly DMR's names; the alert rules and dashboard are valid (promtool, JSON) and use
//! metric names the binaries export; the scripts pass shellcheck.

use std::process::Command;

#[test]
fn systemd_units_verify() {
    let out = Command::new("scripts/verify-systemd.sh")
        .output()
        .expect("run scripts/verify-systemd.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        out.status.code(),
        Some(77),
        "systemd-analyze is missing: install Debian's systemd (.ci/run does)\n{text}"
    );
    assert!(
        out.status.success(),
        "systemd units failed verification:\n{text}"
    );
}

#[test]
fn help_survives_a_closed_stdout() {
    // As in `dmr-server run --help | head`: writing help to a closed stdout must not panic.
    for bin in [
        env!("CARGO_BIN_EXE_dmr-server"),
        env!("CARGO_BIN_EXE_dmr-agent"),
    ] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{{ sleep 0.3; {bin} run --help; }} | true"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{bin}: {err}");
        assert!(out.status.success(), "{bin}: {err}");
    }
}

// RabbitMQ set-up script -------------------------------------------------------------------------

/// `rabbitmqctl` lives in /usr/sbin, which a test's PATH may lack.
fn admin_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/local/sbin:/usr/sbin:/sbin")
}

fn run_script(script: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(script)
        .args(args)
        .env("PATH", admin_path())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("60")
        .arg("rabbitmqctl")
        .args(args)
        .env("PATH", admin_path())
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes the throw-away user and vhost however the test ends.
struct Cleanup {
    user: String,
    vhost: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = run_script(
            "scripts/rabbitmq-setup.sh",
            &["--delete-user", &self.user, "--delete-vhost", &self.vhost],
        );
    }
}

#[test]
fn rabbitmq_setup_grants_the_server_user_only_dmr_names() {
    let tag = format!("ops-{}-{}", std::process::id(), fastrand::u32(..));
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("server.password");
    let password_file = password_file.to_str().unwrap();
    let (user, vhost) = (format!("{tag}-server"), format!("{tag}-vhost"));
    let cleanup = Cleanup {
        user: user.clone(),
        vhost: vhost.clone(),
    };
    let (user, vhost) = (user.as_str(), vhost.as_str());
    let args = [
        "--server-user",
        user,
        "--dmr-vhost",
        vhost,
        "--queue-prefix",
        "t1.x.",
        "--password-file",
        password_file,
    ];
    // Twice: the second run must find everything in place and change nothing.
    for round in 0..2 {
        let (ok, text) = run_script("scripts/rabbitmq-setup.sh", &args);
        assert!(ok, "rabbitmq-setup.sh round {round} failed:\n{text}");
        assert!(
            !text.contains(&std::fs::read_to_string(password_file).unwrap()),
            "the password was printed:\n{text}"
        );
    }

    let listed = rabbitmqctl(&["-q", "list_permissions", "-p", vhost]);
    let mut rows: Vec<&str> = listed.lines().skip(1).collect();
    rows.sort();
    let re = r"^t1\.x\.dmr\.";
    assert_eq!(
        rows,
        [format!("{user}\t{re}\t{re}\t{re}")],
        "exactly one user (not guest) with rights on DMR's names only"
    );
    let users = rabbitmqctl(&["-q", "list_users"]);
    assert!(
        users.lines().any(|l| l == format!("{user}\t[]")),
        "the server user has no tags:\n{users}"
    );
    let meta = std::fs::metadata(password_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let password = std::fs::read_to_string(password_file).unwrap();
    rabbitmqctl(&["-q", "authenticate_user", user, password.trim()]);

    drop(cleanup);
    let vhosts = rabbitmqctl(&["-q", "list_vhosts", "name"]);
    assert!(!vhosts.lines().any(|l| l == vhost), "vhost left behind");
}

#[test]
fn rabbitmq_setup_writes_a_tls_listener_snippet() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, "-----BEGIN CERTIFICATE-----\n").unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (ca, cert, key) = (file("ca.pem"), file("server.pem"), file("server.key"));
    let conf = dir.path().join("conf.d/20-dmr-tls.conf");
    let conf = conf.to_str().unwrap();
    let (ok, text) = run_script(
        "scripts/rabbitmq-setup.sh",
        &[
            "--tls",
            &ca,
            &cert,
            &key,
            "--tls-listen",
            "127.0.0.1:5671",
            "--tls-conf",
            conf,
        ],
    );
    assert!(ok, "{text}");
    let written = std::fs::read_to_string(conf).unwrap();
    for line in [
        "listeners.ssl.dmr = 127.0.0.1:5671".to_owned(),
        format!("ssl_options.cacertfile = {ca}"),
        format!("ssl_options.certfile = {cert}"),
        format!("ssl_options.keyfile = {key}"),
    ] {
        assert!(written.lines().any(|l| l == line), "{line} in:\n{written}");
    }
    let (ok, text) = run_script(
        "scripts/rabbitmq-setup.sh",
        &["--tls", "relative.pem", &cert, &key, "--tls-conf", conf],
    );
    assert!(!ok, "a relative path must be refused:\n{text}");
}

// Monitoring files -------------------------------------------------------------------------------

const RULES: &str = "deploy/prometheus/dmr-alerts.yml";
const DASHBOARD: &str = "deploy/grafana/dmr-dashboard.json";

/// Metrics the alerts and dashboard use before the code exports them (docs/OPERATIONS.md).
const PROPOSED: &[&str] = &["dmr_server_directory_last_success_timestamp_seconds"];

fn promtool_check(file: &str) {
    let out = Command::new("promtool")
        .args(["check", "rules", file])
        .output()
        .expect("promtool not found: install Debian's prometheus package (scripts/test.sh does)");
    assert!(
        out.status.success(),
        "promtool check rules {file}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool() {
    promtool_check(RULES);
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_has_a_runbook_section() {
    let rules = std::fs::read_to_string(RULES).unwrap();
    let doc = std::fs::read_to_string("docs/OPERATIONS.md").unwrap();
    let anchors: Vec<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| anchor(h.trim_start_matches('#')))
        .collect();
    let alerts = rules.matches("- alert: ").count();
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert!(alerts > 0);
    assert_eq!(links.len(), alerts, "one runbook_url per alert");
    for link in links {
        let target = link
            .trim_matches('"')
            .strip_prefix("docs/OPERATIONS.md#")
            .unwrap_or_else(|| panic!("{link} does not point into docs/OPERATIONS.md"));
        assert!(
            anchors.iter().any(|a| a == target),
            "docs/OPERATIONS.md has no section for #{target}"
        );
    }
}

/// Every series name the exposition of either binary can carry.
fn exported_names() -> Vec<String> {
    let text = dmr::metrics::exposition_of_every_metric();
    let mut names = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#") || words.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        names.push(name.to_owned());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// The `dmr_server_*` / `dmr_agent_*` names a file refers to.
fn referenced_names(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for start in ["dmr_server_", "dmr_agent_"] {
        for (at, _) in text.match_indices(start) {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

#[test]
fn alerts_and_dashboard_use_exported_metric_names() {
    let exported = exported_names();
    for file in [RULES, DASHBOARD] {
        let text = std::fs::read_to_string(file).unwrap();
        let names = referenced_names(&text);
        assert!(!names.is_empty(), "{file} refers to no DMR metric");
        for name in names {
            assert!(
                exported.contains(&name) || PROPOSED.contains(&name.as_str()),
                "{file} uses {name}, which neither binary exports"
            );
        }
    }
}

#[test]
fn dashboard_is_valid_and_every_panel_queries_something() {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        panels.push(p);
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
    }
    let mut exprs = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no target");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(
                !expr.is_empty(),
                "panel {title:?} has a target without expr"
            );
            exprs.push(expr.to_owned());
        }
    }
    assert!(exprs.len() >= 10, "only {} queries", exprs.len());
    assert!(
        exprs.iter().any(|e| e.contains("rabbitmq_queue_messages")),
        "the dashboard shows RabbitMQ's queues"
    );

    // PromQL syntax: promtool checks each query as a recording rule.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(e).unwrap();
        rules += &format!("      - record: dashboard_query_{i}\n        expr: {quoted}\n");
    }
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, rules).unwrap();
    promtool_check(path.to_str().unwrap());
}

#[test]
fn scripts_pass_shellcheck() {
    let scripts: Vec<String> = std::fs::read_dir("scripts")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert!(!scripts.is_empty());
    let out = Command::new("shellcheck")
        .arg("-x")
        .args(&scripts)
        .output()
        .expect("shellcheck not found: apt-get install shellcheck (scripts/test.sh does)");
    assert!(
        out.status.success(),
        "shellcheck:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn scripts_explain_themselves() {
    for script in [
        "scripts/rabbitmq-setup.sh",
        "scripts/rabbitmq-tls-node.sh",
        "scripts/rabbitmq-cluster.sh",
        "scripts/chaos.sh",
        "scripts/build-static.sh",
    ] {
        let (ok, text) = run_script(script, &["--help"]);
        assert!(ok && text.contains("usage:"), "{script} --help:\n{text}");
    }
}
