//! Records the git commit the binaries are built from (`--version`, `dmr_build_info`):
//! `DMR_GIT_SHA` from the environment if set (container builds without `.git`), else
//! `git rev-parse --short HEAD` when git and the repository are there, else nothing.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=DMR_GIT_SHA");
    let sha = std::env::var("DMR_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(git_sha);
    if let Some(sha) = sha {
        println!("cargo:rustc-env=DMR_GIT_SHA={sha}");
    }
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn git_sha() -> Option<String> {
    // Rebuild when HEAD moves: HEAD itself, the branch it points to, packed refs. Only
    // files that exist: cargo reruns the script on every build for a missing one.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for path in watched {
        if let Some(p) = git(&["rev-parse", "--git-path", &path]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}
