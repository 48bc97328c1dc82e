//! Log output of both binaries (`--log-format text|json`, env `DMR_LOG_FORMAT`).
//!
//! `text` is env_logger's usual human line. `json` writes one object per line with `time`
//! (RFC 3339, UTC), `level`, `target` and `message`, for log shippers that would otherwise
//! have to guess where a multi-line message ends. Filtering stays with `RUST_LOG`.

use std::fmt;
use std::io::Write;
use std::str::FromStr;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "--log-format: {other:?} is not a log format; use text or json"
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Installs the logger (stderr, `RUST_LOG`, `info` by default). Later calls do nothing.
pub fn init(format: LogFormat) {
    let env = env_logger::Env::default().default_filter_or("info");
    let mut builder = env_logger::Builder::from_env(env);
    match format {
        LogFormat::Text => builder.format_timestamp_millis(),
        LogFormat::Json => builder.format(|buf, record| {
            writeln!(
                buf,
                "{}",
                json_line(record.level(), record.target(), record.args())
            )
        }),
    };
    let _ = builder.try_init();
}

/// One log record as a JSON object (no trailing newline).
pub fn json_line(level: log::Level, target: &str, message: &fmt::Arguments<'_>) -> String {
    serde_json::json!({
        "time": crate::audit::rfc3339(std::time::SystemTime::now()),
        "level": level.as_str(),
        "target": target,
        "message": message.to_string(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_bad_ones_are_named() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        let e = "xml".parse::<LogFormat>().unwrap_err();
        assert!(e.contains("\"xml\"") && e.contains("text or json"), "{e}");
    }

    #[test]
    fn json_lines_escape_what_they_carry() {
        let line = json_line(
            log::Level::Warn,
            "dmr::server",
            &format_args!("two\nlines \"quoted\""),
        );
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], "dmr::server");
        assert_eq!(v["message"], "two\nlines \"quoted\"");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
