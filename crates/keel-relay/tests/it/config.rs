//! The configuration an operator writes: the sample file, `check-config`
//! and `print-default-config`.

use std::path::PathBuf;
use std::process::Output;

use keel_relay::Config;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn relay(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keel-relay"))
        .args(args)
        .output()
        .unwrap()
}

/// contrib/keel-relay.toml sets every option to its default, and says so:
/// loaded, it is `Config::default()`; `check-config` passes it and prints
/// the configuration in effect, which reads back as the same.
#[test]
fn the_sample_file_is_the_defaults_and_checks() {
    let sample = repo("contrib/keel-relay.toml");
    assert_eq!(Config::load(&sample).unwrap(), Config::default());
    let out = relay(&["check-config", sample.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let printed: Config = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(printed, Config::default());
    let out = relay(&["print-default-config"]);
    assert_eq!(out.status.code(), Some(0));
    let printed: Config = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(printed, Config::default());
}

/// The commented example in docs/relay-config.md is the sample file (less
/// its two header lines): the two cannot drift apart.
#[test]
fn the_docs_show_the_sample_file() {
    let doc = std::fs::read_to_string(repo("docs/relay-config.md")).unwrap();
    let block: String = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap()
        .to_owned();
    let sample = std::fs::read_to_string(repo("contrib/keel-relay.toml")).unwrap();
    let body = sample.splitn(4, '\n').nth(3).unwrap();
    assert_eq!(block, body);
}

/// A bad file: exit 2, and stderr names the file and the key.
#[test]
fn a_bad_file_is_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[limits]\npublish_rat = 10\n", "publish_rat"),
        ("[limits]\npublish_rate = 0\n", "limits.publish_rate"),
        ("listen = \"nowhere\"\n", "listen"),
        ("durability = \"sometimes\"\n", "durability"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = relay(&["check-config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains(key) && err.contains(path.to_str().unwrap()),
            "{text}: {err}"
        );
        assert!(out.stdout.is_empty(), "nothing printed as in effect");
    }
    let out = relay(&["check-config", "/nonexistent/keel.toml"]);
    assert_eq!(out.status.code(), Some(2));
}
