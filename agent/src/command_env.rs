//! The environment of every command the agent runs for an app (`migrate`, `restart`,
//! `stop`, and compose): the `DEPLOY_*` variables, defined once for the deploy and for
//! destroy. A review-app instance adds `DEPLOY_INSTANCE` and `DEPLOY_PORT`
//! ([`crate::ports::vars`]).

use std::collections::BTreeMap;

use proto::AppRef;

use crate::ports;
use crate::release::layout::Layout;

/// The environment of a command of `app` run in `release`. `version` is that release's
/// (on a rollback, the old one's); `previous` what a failed deploy goes back to.
pub fn command_env(
    app: &AppRef,
    layout: &Layout,
    release: &str,
    version: Option<String>,
    previous: Option<&str>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("DEPLOY_APP".into(), app.name.clone());
    env.insert("DEPLOY_RELEASE".into(), release.to_owned());
    env.insert(
        "DEPLOY_RELEASE_DIR".into(),
        layout.release(release).display().to_string(),
    );
    env.insert("DEPLOY_VERSION".into(), version.unwrap_or_default());
    env.insert(
        "DEPLOY_PREVIOUS_RELEASE".into(),
        previous.unwrap_or_default().to_owned(),
    );
    env.insert("DEPLOY_TO".into(), layout.root.display().to_string());
    env.extend(ports::vars(app).into_iter().flatten());
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_gets_the_deploy_variables() {
        let l = Layout::new("/srv/app");
        let app = AppRef {
            name: "app".into(),
            deploy_to: "/srv/app".into(),
            instance: None,
        };
        let env = command_env(&app, &l, "20260101000000", Some("v1".into()), None);
        assert_eq!(env["DEPLOY_APP"], "app");
        assert_eq!(
            env["DEPLOY_RELEASE_DIR"],
            "/srv/app/releases/20260101000000"
        );
        assert_eq!(env["DEPLOY_VERSION"], "v1");
        assert_eq!(env["DEPLOY_PREVIOUS_RELEASE"], "");
        assert_eq!(env["DEPLOY_TO"], "/srv/app");
        assert!(!env.contains_key("DEPLOY_PORT"));
    }
}
