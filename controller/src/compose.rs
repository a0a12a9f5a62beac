//! The compose strategy on the controller: the release artifact of a compose push.
//!
//! A compose release is a small `.tar.gz` that holds exactly what is deployed: the
//! compose files (by file name, in the order given) and the env file, rendered with
//! `${VAR}` expanded from this process's environment, so a workflow can pin images with
//! `BACKEND_IMAGE=ghcr.io/org/backend:${GITHUB_SHA}`. It then goes through the same
//! upload, lock, journal, health check and rollback as a release tarball.
//!
//! Rendering the env file:
//!
//! - `${VAR}` is replaced by the variable's value; an unset variable is an error that
//!   names it, the file and the line. `${VAR:-default}` (unset or empty) and
//!   `${VAR-default}` (unset) take the default instead.
//! - `${DEPLOY_*}` is kept for the server (the agent sets `DEPLOY_RELEASE`, ...).
//! - `$$`, a `$` not followed by `{`, and comment lines are kept as written: compose
//!   reads the file again on the server and has its own rules for those.
//! - A value that brings a `$` of its own (a password from CI, say) must reach the
//!   containers as it is, and there v1 and v2 differ: v1 (1.29, python-dotenv 0.21)
//!   expands `${VAR}` in every value, quoted or not, and leaves any other `$` alone; v2
//!   expands `$VAR`, `${VAR}` and `$$` in unquoted and double-quoted values and nothing
//!   in single-quoted ones. So `KEY=${VAR}` is written `KEY='<value>'` when the value
//!   holds a `$`, which both read literally; a value holding `${` (v1 would expand it,
//!   and has no escape) and a line where quoting cannot be done (double quotes, other
//!   `$` for compose, a `'` or `\` in the value, an inline comment) are errors naming
//!   the variable.
//!
//! Each compose file must be valid YAML: a syntax error is a usage error naming the file,
//! line and column, found before anything is sent. Compose would find it on the server
//! too, but v2 names neither the file nor (go-yaml's count is off by one) the right line.
//!
//! `zero_downtime` services are checked against the files before anything is sent
//! ([`check_zero_downtime`]): each must be defined, define a healthcheck, and not
//! publish a fixed host port nor set `container_name` (two containers of it run side by
//! side during a deploy). A failure is a usage error (exit 2) naming the service.
//!
//! The archive is deterministic (fixed mtime and modes), so the same inputs give the
//! same sha256.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{Environment, Strategy};
use crate::exit::Failure;

/// The artifact of a compose push; the temp file is removed when this is dropped.
pub struct Bundle {
    pub file: tempfile::NamedTempFile,
    /// Names inside the release, as passed to `-f`.
    pub files: Vec<String>,
    pub env_file: Option<String>,
}

impl Bundle {
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// The names files get in the release: the last path component.
pub fn release_names(env: &Environment) -> (Vec<String>, Option<String>) {
    let files = env.compose.files.iter().map(|f| file_name(f)).collect();
    let env_file = env.compose.env_file.as_deref().map(file_name);
    (files, env_file)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Builds the artifact for `env` (with `--compose` already applied to
/// `env.compose.files`), reading variables from the process environment. Every error is
/// a usage error: nothing has been sent anywhere yet.
pub fn bundle(env: &Environment) -> Result<Bundle, Failure> {
    bundle_with(env, &|k| std::env::var(k).ok())
}

pub fn bundle_with(
    env: &Environment,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Result<Bundle, Failure> {
    if env.strategy != Strategy::Compose {
        return Err(Failure::usage(format!(
            "environment {} does not use strategy = \"compose\"",
            env.name
        )));
    }
    let (names, env_name) = release_names(env);
    let mut seen = BTreeSet::new();
    for (path, name) in env
        .compose
        .files
        .iter()
        .zip(&names)
        .chain(env.compose.env_file.iter().zip(&env_name))
    {
        if name.is_empty() || name == "." || name == ".." || name.starts_with('-') {
            return Err(Failure::usage(format!(
                "compose file {}: not a file name",
                path.display()
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(Failure::usage(format!(
                "two files would both be {name:?} in the release ({}): compose files \
                 and the env file are stored by file name, so the names must differ",
                path.display()
            )));
        }
    }
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for (path, name) in env.compose.files.iter().zip(&names) {
        let data = read(path, "compose file")?;
        check_yaml(&data).map_err(|e| {
            Failure::usage(format!(
                "compose file {}: {e}; nothing was changed",
                path.display()
            ))
        })?;
        entries.push((name.clone(), data));
    }
    if !env.compose.zero_downtime.is_empty() {
        let files: Vec<(String, String)> = env
            .compose
            .files
            .iter()
            .zip(&entries)
            .map(|(p, (_, data))| {
                (
                    p.display().to_string(),
                    String::from_utf8_lossy(data).into_owned(),
                )
            })
            .collect();
        check_zero_downtime(&env.compose.zero_downtime, &files).map_err(|e| {
            Failure::usage(format!("compose.zero_downtime: {e}; nothing was changed"))
        })?;
    }
    if let (Some(path), Some(name)) = (&env.compose.env_file, &env_name) {
        let text = String::from_utf8(read(path, "env file")?)
            .map_err(|_| Failure::usage(format!("env file {}: not UTF-8 text", path.display())))?;
        let rendered = render_env_file(&text, getenv).map_err(|e| {
            Failure::usage(format!(
                "env file {}: {e}; nothing was changed",
                path.display()
            ))
        })?;
        entries.push((name.clone(), rendered.into_bytes()));
    }
    let file = tempfile::Builder::new()
        .prefix("deployctl-compose-")
        .suffix(".tar.gz")
        .tempfile()
        .map_err(|e| Failure::usage(format!("cannot create a temp file: {e}")))?;
    write_tar_gz(file.as_file(), &entries)
        .map_err(|e| Failure::usage(format!("cannot write the compose bundle: {e}")))?;
    Ok(Bundle {
        file,
        files: names,
        env_file: env_name,
    })
}

/// Whether `data` parses as YAML (syntax only: what the keys mean is compose's to check,
/// with `config -q` on the server). The error says where, 1-based.
pub fn check_yaml(data: &[u8]) -> Result<(), String> {
    struct Ignore;
    impl yaml_rust2::parser::EventReceiver for Ignore {
        fn on_event(&mut self, _: yaml_rust2::Event) {}
    }
    let text = std::str::from_utf8(data).map_err(|_| "not UTF-8 text".to_owned())?;
    yaml_rust2::parser::Parser::new_from_str(text)
        .load(&mut Ignore, true)
        .map_err(|e| {
            format!(
                "not valid YAML: {} at line {}, column {}",
                e.info(),
                e.marker().line(),
                e.marker().col() + 1
            )
        })
}

/// Checks each `zero_downtime` service against the compose `files` (name, text; merged
/// in order, as compose merges them): it is defined, has a healthcheck (`test`, not
/// `disable: true`), publishes no fixed host port (`"8080:80"`, `"127.0.0.1:8080:80"`,
/// `published: 8080`; a container-only `"80"` or `"127.0.0.1::80"` is fine) and sets no
/// `container_name`. The error names the service and the file.
pub fn check_zero_downtime(services: &[String], files: &[(String, String)]) -> Result<(), String> {
    use yaml_rust2::{Yaml, YamlLoader};
    let mut docs = Vec::new();
    for (name, text) in files {
        let doc = YamlLoader::load_from_str(text)
            .map_err(|e| format!("{name}: not valid YAML: {e}"))?
            .into_iter()
            .next()
            .unwrap_or(Yaml::Null);
        docs.push((name, doc));
    }
    let all = files
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    for service in services {
        let defs: Vec<(&String, &Yaml)> = docs
            .iter()
            .filter_map(|(file, doc)| {
                let def = &doc["services"][service.as_str()];
                (!def.is_badvalue() && !def.is_null()).then_some((*file, def))
            })
            .collect();
        if defs.is_empty() {
            return Err(format!(
                "service `{service}` is not defined in the compose files ({all})"
            ));
        }
        let mut healthcheck = false;
        for (file, def) in &defs {
            if let Some(name) = def["container_name"].as_str() {
                return Err(format!(
                    "service `{service}` sets container_name `{name}` ({file}): two \
                     containers of it run side by side during a deploy, so it cannot \
                     have a fixed name"
                ));
            }
            if let Some(ports) = def["ports"].as_vec() {
                for p in ports {
                    if let Some(fixed) = fixed_host_port(p) {
                        return Err(format!(
                            "service `{service}` publishes the fixed host port {fixed} \
                             ({file}): two containers of it run side by side during a \
                             deploy and cannot both bind it; publish no host port and \
                             route to it by service name through a proxy service"
                        ));
                    }
                }
            }
            let h = &def["healthcheck"];
            if !h.is_badvalue() && !h.is_null() {
                healthcheck = h["disable"].as_bool() != Some(true) && !h["test"].is_badvalue();
            }
        }
        if !healthcheck {
            return Err(format!(
                "service `{service}` defines no healthcheck in the compose files ({all}): \
                 a new container must report healthy before the old one leaves; add a \
                 `healthcheck:` with a `test`"
            ));
        }
    }
    Ok(())
}

/// The host port an entry of `ports:` publishes, when it fixes one.
fn fixed_host_port(p: &yaml_rust2::Yaml) -> Option<String> {
    use yaml_rust2::Yaml;
    match p {
        // `- 80`: a container port; Docker picks the host port.
        Yaml::Integer(_) => None,
        Yaml::String(s) => {
            let s = s.split('/').next().unwrap_or(s);
            // `[HOST_IP:]HOST_PORT:CONTAINER_PORT`; HOST_IP may be `[::1]`.
            let (host, _container) = s.rsplit_once(':')?;
            let port = match host.rsplit_once(':') {
                Some((_ip, port)) => port,
                None => host,
            };
            (!port.is_empty()).then(|| port.to_owned())
        }
        Yaml::Hash(_) => match &p["published"] {
            Yaml::Integer(n) => Some(n.to_string()),
            Yaml::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::usage(format!("{what} {}: {e}", path.display())))
}

fn write_tar_gz(out: &std::fs::File, entries: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data.as_slice())?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()?.sync_all()
}

/// Expands `${VAR}` (see the module docs). The error names the variable and the line.
pub fn render_env_file(
    text: &str,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let rendered = render_line(line, getenv)
            .and_then(|r| literal_dollars(line, r))
            .map_err(|e| format!("line {}: {e}", i + 1))?;
        out.push_str(&rendered);
    }
    Ok(out)
}

/// One rendered line, and what [`literal_dollars`] needs to know about it.
struct Rendered {
    text: String,
    /// Variables whose expanded value holds a `$`.
    dollar_values: Vec<String>,
    /// Variables whose expanded value holds `${`.
    brace_values: Vec<String>,
    /// The line keeps a `$` for compose (`$$`, `$x`, `${DEPLOY_*}`).
    kept_dollar: bool,
}

/// Makes compose v1 and v2 read an expanded `$` literally (see the module docs).
fn literal_dollars(raw: &str, r: Rendered) -> Result<String, String> {
    if let Some(var) = r.brace_values.first() {
        return Err(format!(
            "the value of ${{{var}}} holds `${{`, which Compose v1 expands in an env file \
             however it is quoted (it has no escape for it): compose cannot pass it on as it is"
        ));
    }
    let Some(var) = r.dollar_values.first() else {
        return Ok(r.text);
    };
    let why = || {
        format!(
            "the value of ${{{var}}} holds `$`, which Compose v2 would expand again on the \
             server (v1 would not)"
        )
    };
    let body = raw.trim_end_matches(['\n', '\r']);
    let ending = &raw[body.len()..];
    let Some((key, raw_value)) = body.split_once('=') else {
        return Err(format!("{}; it is not on a KEY=value line", why()));
    };
    let raw_value = raw_value.trim();
    if raw_value.starts_with('\'') {
        // single quotes: literal for both, as long as the value does not end them
        if r.text[key.len() + 1..].trim().matches('\'').count() == 2 {
            return Ok(r.text);
        }
        return Err(format!(
            "the value of ${{{var}}} holds a `'` inside single quotes"
        ));
    }
    if raw_value.starts_with('"') {
        return Err(format!(
            "{}; write {}='${{{var}}}' (single quotes: literal for both)",
            why(),
            key.trim()
        ));
    }
    let value = r.text[key.len() + 1..]
        .trim_end_matches(['\n', '\r'])
        .trim();
    if key.contains('$')
        || r.kept_dollar
        || raw_value.contains(" #")
        || value.contains(['\'', '\\'])
    {
        return Err(format!(
            "{}, and deployctl can single-quote it only on a plain KEY=${{{var}}} line \
             without other `$`, quotes, backslashes or comments",
            why()
        ));
    }
    Ok(format!("{key}='{value}'{ending}"))
}

fn render_line(line: &str, getenv: &dyn Fn(&str) -> Option<String>) -> Result<Rendered, String> {
    let mut dollar_values = Vec::new();
    let mut brace_values = Vec::new();
    let mut kept_dollar = false;
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let from = &rest[i..];
        if let Some(after) = from.strip_prefix("$$") {
            out.push_str("$$");
            kept_dollar = true;
            rest = after;
            continue;
        }
        let Some(inner) = from.strip_prefix("${") else {
            out.push('$');
            kept_dollar = true;
            rest = &from[1..];
            continue;
        };
        let Some(end) = inner.find('}') else {
            return Err("unterminated `${` (write `$${` for a literal `${`)".into());
        };
        let expr = &inner[..end];
        let name_len = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, op) = expr.split_at(name_len);
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("`${{{expr}}}` is not a variable reference"));
        }
        if name.starts_with("DEPLOY_") {
            out.push_str(&from[..end + 3]);
            kept_dollar = true;
        } else {
            let value = getenv(name);
            let expanded = if let Some(default) = op.strip_prefix(":-") {
                value
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| default.to_owned())
            } else if let Some(default) = op.strip_prefix('-') {
                value.unwrap_or_else(|| default.to_owned())
            } else if op.is_empty() {
                value.ok_or_else(|| {
                    format!(
                        "${{{name}}} is not set in deployctl's environment \
                         (set {name}, or write ${{{name}:-default}})"
                    )
                })?
            } else {
                return Err(format!(
                    "`${{{expr}}}`: only ${{VAR}}, ${{VAR:-default}} and ${{VAR-default}} \
                     are expanded"
                ));
            };
            if expanded.contains('$') {
                dollar_values.push(name.to_owned());
            }
            if expanded.contains("${") {
                brace_values.push(name.to_owned());
            }
            out.push_str(&expanded);
        }
        rest = &inner[end + 1..];
    }
    out.push_str(rest);
    Ok(Rendered {
        text: out,
        dollar_values,
        brace_values,
        kept_dollar,
    })
}

#[cfg(test)]
mod zero_downtime_tests {
    use super::*;

    const BASE: &str = "services:
  web:
    image: web
    ports: [\"8080\", \"127.0.0.1::81\", 82]
    healthcheck:
      test: [\"CMD\", \"true\"]
  proxy:
    image: nginx
    ports: [\"127.0.0.1:8000:80\"]
";

    fn check(services: &[&str], files: &[&str]) -> Result<(), String> {
        let services: Vec<String> = services.iter().map(|s| (*s).to_owned()).collect();
        let files: Vec<(String, String)> = files
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("f{i}.yml"), (*t).to_owned()))
            .collect();
        check_zero_downtime(&services, &files)
    }

    #[test]
    fn a_service_with_a_healthcheck_and_container_ports_only_passes() {
        assert_eq!(check(&["web"], &[BASE]), Ok(()));
    }

    #[test]
    fn fixed_host_ports_are_refused_naming_the_service() {
        for ports in [
            "[\"8080:80\"]",
            "[\"127.0.0.1:8080:80\"]",
            "[\"[::1]:8080:80/tcp\"]",
            "[{target: 80, published: 8080}]",
            "[{target: 80, published: \"8080\"}]",
        ] {
            let over = format!("services:\n  web:\n    ports: {ports}\n");
            let e = check(&["web"], &[BASE, &over]).unwrap_err();
            assert!(
                e.contains("service `web` publishes the fixed host port 8080"),
                "{e}"
            );
            assert!(e.contains("f1.yml"), "{e}");
        }
        // The proxy publishes a fixed port, and is not listed: fine.
        assert_eq!(check(&["web"], &[BASE]), Ok(()));
        let e = check(&["proxy"], &[BASE]).unwrap_err();
        assert!(
            e.contains("service `proxy` publishes the fixed host port 8000"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_or_disabled_healthcheck_is_refused() {
        let none = "services:\n  web:\n    image: web\n";
        let e = check(&["web"], &[none]).unwrap_err();
        assert!(e.contains("service `web` defines no healthcheck"), "{e}");
        let disabled = "services:\n  web:\n    healthcheck:\n      disable: true\n";
        let e = check(&["web"], &[BASE, disabled]).unwrap_err();
        assert!(e.contains("service `web` defines no healthcheck"), "{e}");
        // Defined in a later file is enough.
        let later = "services:\n  web:\n    healthcheck:\n      test: [\"CMD\", \"true\"]\n";
        assert_eq!(check(&["web"], &[none, later]), Ok(()));
    }

    #[test]
    fn an_unknown_service_or_a_container_name_is_refused() {
        let e = check(&["api"], &[BASE]).unwrap_err();
        assert!(e.contains("service `api` is not defined"), "{e}");
        let named = "services:\n  web:\n    container_name: web1\n";
        let e = check(&["web"], &[BASE, named]).unwrap_err();
        assert!(
            e.contains("service `web` sets container_name `web1`"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;

    use super::*;
    use crate::config::Config;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn env_files_expand_variables_and_keep_the_rest() {
        let text = "# pinned by CI: ${NOT_EXPANDED}\n\
                    BACKEND_IMAGE=${BACKEND_IMAGE}\n\
                    TAG=${TAG:-latest}\n\
                    EMPTY=${EMPTY:-fallback} ${EMPTY-kept}\n\
                    PORT=${DEPLOY_PORT}\n\
                    PASSWORD=a$$b$c\n\
                    LITERAL=$${HOME}\n\
                    no newline at the end ${BACKEND_IMAGE}";
        let out = render_env_file(
            text,
            &vars(&[
                ("BACKEND_IMAGE", "ghcr.io/org/backend:abc123"),
                ("EMPTY", ""),
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            "# pinned by CI: ${NOT_EXPANDED}\n\
             BACKEND_IMAGE=ghcr.io/org/backend:abc123\n\
             TAG=latest\n\
             EMPTY=fallback \n\
             PORT=${DEPLOY_PORT}\n\
             PASSWORD=a$$b$c\n\
             LITERAL=$${HOME}\n\
             no newline at the end ghcr.io/org/backend:abc123"
        );
    }

    #[test]
    fn yaml_syntax_errors_say_where() {
        // See: #12
        let e = check_yaml(b"services:\n  web:\n    image: [unclosed\n").unwrap_err();
        assert!(e.contains("not valid YAML"), "{e}");
        assert!(e.contains("line 3") || e.contains("line 4"), "{e}");
        let e = check_yaml(b"services:\n  web:\n\timage: x\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        // what compose files use parses: anchors, merge keys, tags, several documents
        let ok = "x-common: &common\n  restart: always\n\
                  services:\n  web:\n    <<: *common\n    image: \"${WEB_IMAGE}\"\n\
                  \x20   ports: !reset []\n    command: [\"sh\", \"-c\", 'echo $$HOME']\n\
                  \x20   environment:\n      A: |\n        multi\n        line\n---\n";
        assert_eq!(check_yaml(ok.as_bytes()), Ok(()));
        assert!(check_yaml(b"\xff\xfe").is_err());
    }

    #[test]
    fn a_value_with_a_dollar_is_single_quoted_so_v1_and_v2_read_it_as_it_is() {
        // See: #12
        let v = vars(&[
            ("PW", "pa$word$$x"),
            ("IMG", "app:1"),
            ("Q", "it's$"),
            ("B", "a${b}"),
        ]);
        let render = |t: &str| render_env_file(t, &v);
        assert_eq!(
            render("PW=${PW}\nIMAGE=${IMG}\n").unwrap(),
            "PW='pa$word$$x'\nIMAGE=app:1\n"
        );
        assert_eq!(
            render("export PW=pre-${PW}  \r\n").unwrap(),
            "export PW='pre-pa$word$$x'\r\n"
        );
        assert_eq!(render("PW=${D:-a$b}").unwrap(), "PW='a$b'");
        // already single-quoted: literal for both
        assert_eq!(render("PW='${PW}'\n").unwrap(), "PW='pa$word$$x'\n");
        // what cannot be quoted is an error naming the variable
        for bad in [
            "PW=\"${PW}\"\n",
            "PW=${PW}-${DEPLOY_PORT}\n",
            "PW=${PW}$$\n",
            "PW=${PW} # the password\n",
            "Q=${Q}\n",
            "Q='${Q}'\n",
            "just ${PW}\n",
            "B=${B}\n",
            "B='${B}'\n",
        ] {
            let e = render(bad).unwrap_err();
            assert!(e.contains("line 1"), "{bad}: {e}");
            assert!(
                ["${PW}", "${Q}", "${B}"].iter().any(|v| e.contains(v)),
                "{bad}: {e}"
            );
        }
        // a `$` written in the file itself is compose's, as before
        assert_eq!(render("A=a$$b$c\n").unwrap(), "A=a$$b$c\n");
    }

    #[test]
    fn an_unset_variable_names_itself_and_its_line() {
        let e = render_env_file("A=1\nB=${FRONTEND_IMAGE}\n", &vars(&[])).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("FRONTEND_IMAGE"), "{e}");
        for bad in ["X=${", "X=${1A}", "X=${}", "X=${A:?required}"] {
            assert!(render_env_file(bad, &vars(&[("A", "1")])).is_err(), "{bad}");
        }
    }

    fn env_in(dir: &Path, compose: &str) -> Environment {
        let text = format!(
            "app = \"myapp\"\ndeploy_to = \"/srv/myapp\"\n\
             [environments.edge]\nhosts = [\"edge-1\"]\nstrategy = \"compose\"\n\
             [environments.edge.compose]\n{compose}\n"
        );
        let home = |k: &str| (k == "HOME").then(|| "/home/ci".to_string());
        let config = Config::parse(&text, "deploy.toml", &home).unwrap();
        let mut env = config.environment("edge").unwrap();
        let root = |p: &PathBuf| dir.join(p);
        env.compose.files = env.compose.files.iter().map(root).collect();
        env.compose.env_file = env.compose.env_file.as_ref().map(root);
        env
    }

    fn entries(path: &Path) -> Vec<(String, String, u32)> {
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap());
        let mut tar = tar::Archive::new(gz);
        tar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mode = e.header().mode().unwrap();
                let mut text = String::new();
                e.read_to_string(&mut text).unwrap();
                (name, text, mode)
            })
            .collect()
    }

    #[test]
    fn the_bundle_holds_the_files_by_name_and_the_rendered_env_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("deploy")).unwrap();
        std::fs::write(dir.path().join("docker-compose.yml"), "services: {}\n").unwrap();
        std::fs::write(dir.path().join("deploy/compose.prod.yml"), "x: 1\n").unwrap();
        std::fs::write(dir.path().join(".env.prod"), "IMAGE=${IMAGE}\n").unwrap();
        let env = env_in(
            dir.path(),
            "files = [\"docker-compose.yml\", \"deploy/compose.prod.yml\"]\n\
             env_file = \".env.prod\"",
        );
        let b = bundle_with(&env, &vars(&[("IMAGE", "app:sha")])).unwrap();
        assert_eq!(b.files, ["docker-compose.yml", "compose.prod.yml"]);
        assert_eq!(b.env_file.as_deref(), Some(".env.prod"));
        assert_eq!(
            entries(b.path()),
            [
                ("docker-compose.yml".into(), "services: {}\n".into(), 0o644),
                ("compose.prod.yml".into(), "x: 1\n".into(), 0o644),
                (".env.prod".into(), "IMAGE=app:sha\n".into(), 0o644),
            ]
        );
        // deterministic: the same inputs, the same bytes
        let again = bundle_with(&env, &vars(&[("IMAGE", "app:sha")])).unwrap();
        assert_eq!(
            std::fs::read(b.path()).unwrap(),
            std::fs::read(again.path()).unwrap()
        );
    }

    #[test]
    fn bad_inputs_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/docker-compose.yml"), "").unwrap();
        std::fs::write(dir.path().join("docker-compose.yml"), "").unwrap();
        std::fs::write(dir.path().join(".env"), "X=${MISSING_VAR}\n").unwrap();

        let dup = env_in(
            dir.path(),
            "files = [\"docker-compose.yml\", \"a/docker-compose.yml\"]",
        );
        let e = bundle_with(&dup, &vars(&[])).err().unwrap();
        assert_eq!(e.code, crate::exit::USAGE);
        assert!(e.message.contains("docker-compose.yml"), "{}", e.message);

        let missing = env_in(dir.path(), "files = [\"nope.yml\"]");
        let e = bundle_with(&missing, &vars(&[])).err().unwrap();
        assert!(e.message.contains("nope.yml"), "{}", e.message);

        let unset = env_in(dir.path(), "env_file = \".env\"");
        let e = bundle_with(&unset, &vars(&[])).err().unwrap();
        assert_eq!(e.code, crate::exit::USAGE);
        assert!(e.message.contains("MISSING_VAR"), "{}", e.message);
        assert!(e.message.contains(".env"), "{}", e.message);
    }
}
