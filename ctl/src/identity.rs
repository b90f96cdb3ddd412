//! `vpcgate identity export | import`: one gateway's key, peers and
//! settings, carried to a second one behind the same load balancer.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use clap::Subcommand;
use zeroize::Zeroizing;

/// The largest document read; the daemon's request limit is the same.
const MAX_DOCUMENT: u64 = vpcgate_proto::MAX_FRAME as u64;

#[derive(Subcommand, Debug)]
pub enum IdentityCmd {
    /// Print this gateway's private key, peers and settings as one
    /// document. It is as secret as the key file: pipe it to the second
    /// gateway (`ssh gw2 vpcgate identity import -`) or keep it mode 0600.
    Export,
    /// Become the gateway that exported FILE (`-`: standard input): its
    /// private key, peers and settings replace this one's, live and saved.
    /// The listen port and a drain stay this gateway's own. A file readable
    /// by group or others is refused.
    Import { file: String },
}

/// The document, read from `file` or standard input, wiped when dropped.
pub fn read(file: &str) -> anyhow::Result<Zeroizing<String>> {
    let mut text = Zeroizing::new(String::new());
    if file == "-" {
        std::io::stdin()
            .take(MAX_DOCUMENT + 1)
            .read_to_string(&mut text)
            .context("reading the identity from standard input")?;
    } else {
        let path = Path::new(file);
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mode = f.metadata()?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by group or others (mode {mode:04o}); it holds a private key: \
                 `chmod 600 {}` first",
                path.display(),
                path.display()
            );
        }
        (&mut f)
            .take(MAX_DOCUMENT + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    if text.len() as u64 > MAX_DOCUMENT {
        bail!("the identity is larger than {MAX_DOCUMENT} bytes; it is not one from `identity export`");
    }
    Ok(text)
}

/// Writes the exported document to standard output, and nowhere else.
pub fn print(document: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(document.as_bytes())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_readable_file_is_refused_and_a_private_one_read() {
        let dir = std::env::temp_dir().join(format!("vpcgate-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("identity.json");
        std::fs::write(&path, "{}").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = read(path.to_str().expect("utf-8")).expect_err("refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            read(path.to_str().expect("utf-8")).expect("read").as_str(),
            "{}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
