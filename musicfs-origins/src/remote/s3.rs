//! The S3 operator: bucket, prefix, endpoint and region as AWS users
//! already configure them.
//!
//! Layer: setup of the S3 flavour of the remote origin; no network here.
//!
//! Invariants:
//! - The endpoint is the setting, else `AWS_ENDPOINT_URL_S3`, else
//!   `AWS_ENDPOINT_URL`, else AWS itself; the region is the setting, else
//!   `AWS_REGION` / `AWS_DEFAULT_REGION`, else the profile's `region` in
//!   the shared config file, else `us-east-1` when an endpoint is set (an
//!   S3-compatible store ignores it). On AWS without a region the setup
//!   fails with a message that says how to give one.
//! - Credentials come from reqsign's default chain (environment keys,
//!   the shared config and credentials files for the profile, SSO, web
//!   identity, `credential_process` (with a command runner OpenDAL does not
//!   give it), ECS, EC2 metadata unless
//!   `AWS_EC2_METADATA_DISABLED`, and never with an endpoint set: an
//!   S3-compatible store takes no instance credentials). Its signer caches a credential and loads
//!   a new one when the cached one expires within two minutes, so
//!   temporary credentials are refreshed before they lapse.
//! - Path-style addressing with an endpoint (SeaweedFS, MinIO, Ceph have
//!   no per-bucket host names); virtual-host style on AWS, except for
//!   bucket names with a dot, which TLS cannot serve that way.
//! - No OpenDAL retry layer: one call is one attempt.

use std::path::PathBuf;

use opendal::Operator;
use reqsign_aws_v4::DefaultCredentialProvider;
use reqsign_command_execute_tokio::TokioCommandExecute;
use reqsign_core::{Context, ProvideCredential, ProvideCredentialChain};

use super::spec::RemoteSettings;
use crate::{OriginError, OriginId, Result};

/// Lets a credential provider run commands. OpenDAL's S3 signer hands
/// providers a context without a command runner, so `credential_process`
/// in the AWS config (aws-vault, SSO and SAML helpers: the usual source of
/// credentials that expire) found no credentials at all; this gives the
/// default chain tokio's.
#[derive(Debug)]
struct WithCommands<P>(P);

impl<P: ProvideCredential> ProvideCredential for WithCommands<P> {
    type Credential = P::Credential;

    async fn provide_credential(
        &self,
        ctx: &Context,
    ) -> reqsign_core::Result<Option<Self::Credential>> {
        let ctx = ctx.clone().with_command_execute(TokioCommandExecute);
        self.0.provide_credential(&ctx).await
    }
}

/// Where and how to reach the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Plan {
    pub endpoint: Option<String>,
    pub region: String,
    pub virtual_host: bool,
}

/// Resolves endpoint and region from the settings and the environment
/// (`env` looks a variable up; `config_region` reads the shared config).
pub(crate) fn plan(
    bucket: &str,
    settings: &RemoteSettings,
    env: impl Fn(&str) -> Option<String>,
    config_region: impl FnOnce(&str) -> Option<String>,
) -> std::result::Result<S3Plan, String> {
    let set = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let endpoint = set(settings.endpoint.clone())
        .or_else(|| set(env("AWS_ENDPOINT_URL_S3")))
        .or_else(|| set(env("AWS_ENDPOINT_URL")));
    let profile = set(settings.profile.clone())
        .or_else(|| set(env("AWS_PROFILE")))
        .unwrap_or_else(|| "default".to_owned());
    let region = set(settings.region.clone())
        .or_else(|| set(env("AWS_REGION")))
        .or_else(|| set(env("AWS_DEFAULT_REGION")))
        .or_else(|| config_region(&profile));
    let region = match (region, &endpoint) {
        (Some(region), _) => region,
        (None, Some(_)) => "us-east-1".to_owned(),
        (None, None) => {
            return Err(format!(
                "no region for bucket '{bucket}' on AWS; set AWS_REGION, the origin's region in \
                 the config file, or region in the AWS config of profile '{profile}' (or give an \
                 endpoint for an S3-compatible store)"
            ))
        }
    };
    let virtual_host = endpoint.is_none() && !bucket.contains('.');
    Ok(S3Plan {
        endpoint,
        region,
        virtual_host,
    })
}

/// The `region` of `profile` in the shared AWS config file
/// (`AWS_CONFIG_FILE`, else `~/.aws/config`).
pub(crate) fn config_file_region(profile: &str) -> Option<String> {
    let path = std::env::var_os("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/config")))?;
    let text = std::fs::read_to_string(path).ok()?;
    region_in_config(&text, profile)
}

/// `region = ...` in the `[default]` or `[profile NAME]` section.
pub(crate) fn region_in_config(text: &str, profile: &str) -> Option<String> {
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = header.trim();
            let name = name.strip_prefix("profile ").map(str::trim).unwrap_or(name);
            in_section = name == profile;
            continue;
        }
        if in_section {
            if let Some((key, value)) = line.split_once('=') {
                if key.trim() == "region" && !value.trim().is_empty() {
                    return Some(value.trim().to_owned());
                }
            }
        }
    }
    None
}

/// The operator for `bucket` under `prefix`. No I/O: a store that is down
/// now only shows in the calls.
pub(crate) fn operator(
    id: &OriginId,
    bucket: &str,
    prefix: &str,
    settings: &RemoteSettings,
) -> Result<Operator> {
    let misconfigured = |reason: String| OriginError::Misconfigured {
        origin: id.clone(),
        reason,
    };
    let plan = plan(
        bucket,
        settings,
        |k| std::env::var(k).ok(),
        config_file_region,
    )
    .map_err(misconfigured)?;
    let mut builder = opendal::services::S3::default()
        .bucket(bucket)
        .root(&format!("/{prefix}"))
        .region(&plan.region);
    let mut credentials = DefaultCredentialProvider::builder();
    if let Some(endpoint) = &plan.endpoint {
        builder = builder.endpoint(endpoint);
        // An S3-compatible store takes no EC2 instance credentials, and
        // probing the metadata address off EC2 only delays the error.
        credentials = credentials.no_imds();
    }
    if let Some(profile) = &settings.profile {
        credentials = credentials.with_profile(profile);
    }
    builder = builder.credential_provider_chain(
        ProvideCredentialChain::new().push(WithCommands(credentials.build())),
    );
    if plan.virtual_host {
        builder = builder.enable_virtual_host_style();
    }
    super::install_http();
    Operator::new(builder).map_err(|e| misconfigured(format!("S3 bucket '{bucket}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn no_config(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_setting_wins_then_the_s3_endpoint_then_the_general_one() {
        let settings = RemoteSettings {
            endpoint: Some("http://127.0.0.1:8333".into()),
            ..Default::default()
        };
        let vars = [
            ("AWS_ENDPOINT_URL_S3", "http://s3only:1"),
            ("AWS_ENDPOINT_URL", "http://general:2"),
        ];
        let p = plan("music", &settings, env(&vars), no_config).unwrap();
        assert_eq!(p.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        let p = plan("music", &RemoteSettings::default(), env(&vars), no_config).unwrap();
        assert_eq!(p.endpoint.as_deref(), Some("http://s3only:1"));
        let p = plan(
            "music",
            &RemoteSettings::default(),
            env(&vars[1..]),
            no_config,
        )
        .unwrap();
        assert_eq!(p.endpoint.as_deref(), Some("http://general:2"));
        // With an endpoint: path style, and a region is not needed.
        assert!(!p.virtual_host);
        assert_eq!(p.region, "us-east-1");
    }

    #[test]
    fn region_from_setting_env_or_profile() {
        let vars = [
            ("AWS_REGION", "eu-west-1"),
            ("AWS_DEFAULT_REGION", "eu-north-1"),
        ];
        let settings = RemoteSettings {
            region: Some("ap-south-1".into()),
            ..Default::default()
        };
        assert_eq!(
            plan("m", &settings, env(&vars), no_config).unwrap().region,
            "ap-south-1"
        );
        let none = RemoteSettings::default();
        assert_eq!(
            plan("m", &none, env(&vars), no_config).unwrap().region,
            "eu-west-1"
        );
        assert_eq!(
            plan("m", &none, env(&vars[1..]), no_config).unwrap().region,
            "eu-north-1"
        );
        let from_profile = plan("m", &none, env(&[("AWS_PROFILE", "work")]), |p| {
            (p == "work").then(|| "us-west-2".to_owned())
        })
        .unwrap();
        assert_eq!(from_profile.region, "us-west-2");
        assert!(from_profile.virtual_host);
    }

    #[test]
    fn aws_without_a_region_says_how_to_give_one() {
        let err = plan("music", &RemoteSettings::default(), env(&[]), no_config).unwrap_err();
        assert!(err.contains("AWS_REGION"), "{err}");
        // Dotted buckets cannot be virtual hosts under TLS.
        let settings = RemoteSettings {
            region: Some("us-east-1".into()),
            ..Default::default()
        };
        assert!(
            !plan("my.music", &settings, env(&[]), no_config)
                .unwrap()
                .virtual_host
        );
    }

    #[test]
    fn regions_are_read_from_the_shared_config() {
        let text = "[default]\nregion = eu-central-1\n\n[profile work]\n# comment\nregion=us-west-2\noutput = json\n";
        assert_eq!(
            region_in_config(text, "default").as_deref(),
            Some("eu-central-1")
        );
        assert_eq!(region_in_config(text, "work").as_deref(), Some("us-west-2"));
        assert_eq!(region_in_config(text, "home"), None);
    }
}
