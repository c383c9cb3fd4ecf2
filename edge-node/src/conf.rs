//! Configuration files for the Outpost binaries. A file is TOML whose keys are the binary's
//! long flags without the dashes in front (`data-dir = "/var/lib/outpost-node"`,
//! `insecure-registry = ["10.0.0.5:5000"]`), so a file and a command line say the same things
//! the same way and cannot drift apart. The file's settings come first and flags given on the
//! command line override them.

use std::ffi::OsString;
use std::path::Path;

/// `argv` with the settings of the file named by `--config FILE` (or `--config=FILE`) put in
/// front of the command line's own flags; `argv` as it is without `--config`. Keys that are not
/// flags of `cmd`, and values that are tables, are errors naming the file.
pub fn expand(argv: Vec<OsString>, cmd: &clap::Command) -> Result<Vec<OsString>, String> {
    let mut file = None;
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            file = it.next().cloned();
        } else if let Some(f) = a.strip_prefix("--config=") {
            file = Some(f.into());
        }
    }
    let Some(file) = file else {
        return Ok(argv);
    };
    let settings = read(Path::new(&file), cmd)?;
    let mut out = Vec::with_capacity(argv.len() + settings.len());
    out.extend(argv.first().cloned());
    out.extend(settings);
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

/// The flags a file says, as `--key=value` arguments.
pub fn read(path: &Path, cmd: &clap::Command) -> Result<Vec<OsString>, String> {
    let name = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("config file {name}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {name}: {e}"))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|_| key != "config")
            .ok_or_else(|| {
                format!(
                    "config file {name}: {key:?} is not a setting of {}",
                    cmd.get_name()
                )
            })?;
        let flag = |v: String| OsString::from(format!("--{key}={v}"));
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(n) => Ok(n.to_string()),
                toml::Value::Float(n) => Ok(n.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                _ => Err(format!(
                    "config file {name}: {key} must be a string, number or boolean"
                )),
            }
        };
        match &value {
            toml::Value::Array(vs) => {
                for v in vs {
                    out.push(flag(scalar(v)?));
                }
            }
            toml::Value::Boolean(b) if !arg.get_action().takes_values() => {
                // A switch: present when true.
                if *b {
                    out.push(OsString::from(format!("--{key}")));
                }
            }
            v => out.push(flag(scalar(v)?)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        Command::new("t")
            .args_override_self(true)
            .arg(Arg::new("config").long("config"))
            .arg(Arg::new("data-dir").long("data-dir"))
            .arg(Arg::new("max-pods").long("max-pods"))
            .arg(
                Arg::new("reg")
                    .long("insecure-registry")
                    .action(ArgAction::Append),
            )
            .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn file_settings_come_first_and_flags_override() {
        let f = file("data-dir = \"/d\"\nmax-pods = 7\ninsecure-registry = [\"a:5000\", \"b\"]\nquiet = true\n");
        let argv: Vec<OsString> = [
            "t",
            "--config",
            &f.path().display().to_string(),
            "--max-pods",
            "9",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let args = expand(argv, &cmd()).expect("expands");
        let m = cmd().try_get_matches_from(args).expect("parses");
        assert_eq!(
            m.get_one::<String>("data-dir").map(String::as_str),
            Some("/d")
        );
        assert_eq!(
            m.get_one::<String>("max-pods").map(String::as_str),
            Some("9")
        );
        let regs: Vec<&String> = m.get_many::<String>("reg").expect("regs").collect();
        assert_eq!(regs, ["a:5000", "b"]);
        assert!(m.get_flag("quiet"));
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_errors_naming_the_file() {
        let f = file("data-dri = \"/d\"\n");
        let e = read(f.path(), &cmd()).expect_err("unknown key");
        assert!(e.contains("\"data-dri\" is not a setting"), "{e}");
        let f = file("data-dir = \n");
        let e = read(f.path(), &cmd()).expect_err("bad toml");
        assert!(e.contains("config file"), "{e}");
        let f = file("[data-dir]\nx = 1\n");
        assert!(read(f.path(), &cmd()).is_err());
        let e = read(Path::new("/nonexistent/x.toml"), &cmd()).expect_err("missing");
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
    }

    #[test]
    fn without_config_argv_is_untouched() {
        let argv: Vec<OsString> = ["t", "--data-dir", "/x"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(expand(argv.clone(), &cmd()).expect("ok"), argv);
    }
}
