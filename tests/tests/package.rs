//! The Debian packages, the sysctl file and the cloud-init user data.
//!
//! `packaging/build-deb.sh` builds the amd64 and the arm64 package; each
//! must hold exactly the expected files, owned by root, with static binaries
//! for the right machine that run (under qemu-user-static for the other
//! architecture) and accept every flag the unit passes; a control file that
//! an Ubuntu 18.04 dpkg reads; maintainer scripts that parse; and man pages
//! and bash, zsh and fish completions for both commands, generated from
//! their clap definitions. Building again must give the same bytes.
//!
//! No root is needed, only the tools `.ci/run` installs: dpkg-dev, binutils,
//! musl-tools, gcc-aarch64-linux-gnu, qemu-user-static, python3-yaml. The
//! musl builds go to target/musl, so they never wait on the lock of the
//! `cargo test` that runs them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use vpcgate_e2e::{deb_version, repo_root};

const SYSCTL_FILE: &str = "usr/lib/sysctl.d/90-vpcgate.conf";
/// Lets the service user open /dev/net/tun where it is not 0666.
const TMPFILES_FILE: &str = "usr/lib/tmpfiles.d/vpcgate.conf";
const UNIT_FILE: &str = "lib/systemd/system/vpcgated.service";
const MAN_DIR: &str = "usr/share/man/man8";

/// The man pages and completion scripts of one command, where Debian's
/// man-db, bash-completion, zsh and fish look for them.
fn docs_of(name: &str) -> [String; 4] {
    [
        format!("{MAN_DIR}/{name}.8.gz"),
        format!("usr/share/bash-completion/completions/{name}"),
        format!("usr/share/zsh/vendor-completions/_{name}"),
        format!("usr/share/fish/vendor_completions.d/{name}.fish"),
    ]
}

/// Runs a command and returns its stdout; fails with its stderr.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (.ci/run installs the tools)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package for `arch`, built by `packaging/build-deb.sh`, which must
/// name it after the workspace version and put it in target/packages.
fn build_deb(arch: &str) -> PathBuf {
    let deb = vpcgate_e2e::build_deb(arch).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        deb.parent(),
        Some(repo_root().join("target/packages").as_path()),
        "{}",
        deb.display()
    );
    deb
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vpcgate-pkg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dpkg-deb --contents`: path (without "./") → (mode string, owner).
fn contents(deb: &Path) -> BTreeMap<String, (String, String)> {
    run(Command::new("dpkg-deb").arg("--contents").arg(deb))
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert!(f.len() >= 6, "unexpected dpkg-deb --contents line: {line}");
            let path = f[5].trim_start_matches("./").trim_end_matches('/');
            (path.to_string(), (f[0].to_string(), f[1].to_string()))
        })
        .collect()
}

fn control_fields(deb: &Path) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut last = String::new();
    for line in run(Command::new("dpkg-deb").arg("--field").arg(deb)).lines() {
        if line.starts_with(' ') {
            let value: &mut String = fields.get_mut(&last).expect("a continuation line");
            value.push('\n');
            value.push_str(line);
        } else if let Some((key, value)) = line.split_once(':') {
            last = key.to_string();
            fields.insert(last.clone(), value.trim().to_string());
        }
    }
    fields
}

/// The command line that runs an `arch` binary here: directly on the same
/// machine, else through qemu-user-static.
fn runner(arch: &str, bin: &Path) -> Command {
    let machine = match arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        other => panic!("no machine for {other}"),
    };
    if std::env::consts::ARCH == machine {
        Command::new(bin)
    } else {
        let mut cmd = Command::new(format!("qemu-{machine}-static"));
        cmd.arg(bin);
        cmd
    }
}

fn check_deb(arch: &str, deb: &Path) {
    // What is in it, and who owns it.
    let listing = contents(deb);
    let files: BTreeSet<&str> = listing
        .iter()
        .filter(|(_, (mode, _))| mode.starts_with('-'))
        .map(|(path, _)| path.as_str())
        .collect();
    let docs: Vec<String> = ["vpcgated", "vpcgate"]
        .iter()
        .flat_map(|n| docs_of(n))
        .collect();
    // vpcgate has a page per subcommand too; check_man_pages checks that
    // they are the ones vpcgate.8 names.
    let subcommand_pages: BTreeSet<&str> = files
        .iter()
        .copied()
        .filter(|f| f.starts_with(&format!("{MAN_DIR}/vpcgate-")) && f.ends_with(".8.gz"))
        .collect();
    let mut expected = BTreeSet::from([
        "usr/bin/vpcgated",
        "usr/bin/vpcgate",
        UNIT_FILE,
        SYSCTL_FILE,
        TMPFILES_FILE,
        "usr/share/doc/vpcgate/copyright",
        "usr/share/doc/vpcgate/README.md",
        "usr/share/doc/vpcgate/README.packaging.md",
    ]);
    expected.extend(docs.iter().map(String::as_str));
    expected.extend(&subcommand_pages);
    assert_eq!(files, expected, "the files in {}", deb.display());
    for (path, (mode, owner)) in &listing {
        assert_eq!(owner, "root/root", "{path} is owned by {owner}");
        let want = if mode.starts_with('d') {
            "drwxr-xr-x"
        } else if path.starts_with("usr/bin/") {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, want, "mode of {path:?}");
    }
    assert!(
        listing.keys().all(|p| !p.starts_with("etc")),
        "the package ships nothing in /etc, so it has no conffiles"
    );

    // xz members: the dpkg of Ubuntu 18.04 and Debian before 12 cannot read
    // zstd ones.
    let members = run(Command::new("ar").arg("t").arg(deb));
    assert_eq!(
        members.lines().collect::<Vec<_>>(),
        ["debian-binary", "control.tar.xz", "data.tar.xz"],
        "ar members of {}",
        deb.display()
    );

    let scratch = Scratch::new(arch);
    let root = scratch.0.join("root");
    let control = scratch.0.join("DEBIAN");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));

    // The unit, the sysctl and the tmpfiles file are the repository's.
    let repo = repo_root();
    for (shipped, source) in [
        (UNIT_FILE, "systemd/vpcgated.service"),
        (SYSCTL_FILE, "packaging/sysctl.d/90-vpcgate.conf"),
        (TMPFILES_FILE, "packaging/tmpfiles.d/vpcgate.conf"),
    ] {
        let a = std::fs::read(root.join(shipped)).expect(shipped);
        let b = std::fs::read(repo.join(source)).expect(source);
        assert!(a == b, "{shipped} in the package differs from {source}");
    }
    // Its one line: an ACL entry for the service user on the TUN clone
    // device, which systemd-nspawn makes 0600.
    let tmpfiles = std::fs::read_to_string(root.join(TMPFILES_FILE)).expect(TMPFILES_FILE);
    let lines: Vec<Vec<&str>> = tmpfiles
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [["a+", "/dev/net/tun", "-", "-", "-", "-", "u:vpcgate:rw"]],
        "{TMPFILES_FILE}:\n{tmpfiles}"
    );
    let copyright =
        std::fs::read_to_string(root.join("usr/share/doc/vpcgate/copyright")).expect("copyright");
    assert!(
        copyright.contains("License: BSD-3-Clause") && copyright.contains(" boringtun v"),
        "copyright names our licence and the crates':\n{copyright}"
    );

    // Static binaries for the right machine.
    let machine = match arch {
        "amd64" => "Advanced Micro Devices X86-64",
        _ => "AArch64",
    };
    let unit = std::fs::read_to_string(repo.join("systemd/vpcgated.service")).expect("unit");
    for name in ["vpcgated", "vpcgate"] {
        let bin = root.join("usr/bin").join(name);
        let header = run(Command::new("readelf").arg("-hW").arg(&bin));
        assert!(
            header.contains(machine),
            "{name} in the {arch} package is not for {machine}:\n{header}"
        );
        let program = run(Command::new("readelf").arg("-lW").arg(&bin));
        assert!(
            !program.contains("INTERP"),
            "{name} ({arch}) asks for a program interpreter, so it is not static:\n{program}"
        );
        let dynamic = run(Command::new("readelf").arg("-dW").arg(&bin));
        assert!(
            !dynamic.contains("(NEEDED)"),
            "{name} ({arch}) needs shared libraries:\n{dynamic}"
        );

        let version = run(runner(arch, &bin).arg("--version"));
        assert_eq!(
            version.trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION")),
            "{name} --version ({arch})"
        );
    }
    check_man_pages(&root, &files);
    check_completions(&root);

    // Every flag the unit passes, the packaged daemon knows.
    let help = run(runner(arch, &root.join("usr/bin/vpcgated")).arg("--help"));
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart= in the unit");
    for flag in exec_start
        .split_whitespace()
        .filter(|a| a.starts_with("--"))
    {
        let flag = flag.split('=').next().unwrap_or(flag);
        assert!(
            help.contains(flag),
            "the unit runs vpcgated with {flag}, which vpcgated --help ({arch}) does not list:\n{help}"
        );
    }

    // The control file.
    let fields = control_fields(deb);
    let field = |key: &str| {
        fields
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key}: in the control file: {fields:?}"))
    };
    assert_eq!(field("Package"), "vpcgate");
    assert_eq!(field("Version"), deb_version());
    assert_eq!(field("Architecture"), arch);
    assert!(field("Maintainer").contains('<') && field("Maintainer").ends_with('>'));
    assert!(
        field("Description").contains('\n'),
        "a synopsis and a long description"
    );
    // Nothing that an Ubuntu 18.04 lacks: the binaries are static.
    assert_eq!(field("Depends"), "passwd");
    assert!(field("Recommends").contains("nftables"));
    assert!(field("Suggests").contains("wireguard-tools"));
    let installed_kib: u64 = field("Installed-Size")
        .parse()
        .expect("Installed-Size is a number");
    let bytes: u64 = files
        .iter()
        .map(|f| {
            std::fs::metadata(root.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    assert!(
        installed_kib * 1024 >= bytes && installed_kib * 1024 <= bytes + 1024 * 1024,
        "Installed-Size {installed_kib} KiB, but the files are {bytes} bytes"
    );

    // Maintainer scripts.
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{script}: {e}"));
        assert!(
            text.starts_with("#!/bin/sh\n"),
            "{script} is a /bin/sh script"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect(script).permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "mode of {script}");
        run(Command::new("sh").arg("-n").arg(&path));
    }
    let md5sums = std::fs::read_to_string(control.join("md5sums")).expect("md5sums");
    assert_eq!(
        md5sums.lines().count(),
        expected.len(),
        "md5sums:\n{md5sums}"
    );
}

/// Roff without font changes, with plain hyphens and apostrophes.
fn plain(roff: &str) -> String {
    roff.replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\-", "-")
        .replace("\\*(Aq", "'")
}

/// The man pages: gzip'd without a name or time stamp, each a page of
/// section 8 that documents real options and names only pages that are
/// shipped; and, where man-db is installed, free of the warnings lintian
/// reports.
fn check_man_pages(root: &Path, files: &BTreeSet<&str>) {
    let pages: BTreeMap<&str, String> = files
        .iter()
        .filter_map(|f| Some((*f, f.strip_prefix(&format!("{MAN_DIR}/"))?)))
        .map(|(file, name)| {
            let path = root.join(file);
            let gz = std::fs::read(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            // RFC 1952: flags, then a 4-byte modification time.
            assert!(
                gz.len() > 10 && gz[..2] == [0x1f, 0x8b] && gz[3] & 0x08 == 0 && gz[4..8] == [0; 4],
                "{file} is not gzip'd without a name and time stamp (gzip -n)"
            );
            let roff = run(Command::new("gzip").arg("-dc").arg(&path));
            (name.trim_end_matches(".8.gz"), roff)
        })
        .collect();
    for (name, roff) in &pages {
        let title = roff
            .lines()
            .find(|l| l.starts_with(".TH "))
            .unwrap_or_else(|| panic!("{name}.8 has no .TH line:\n{roff}"));
        let program = if name.starts_with("vpcgated") {
            "vpcgated"
        } else {
            "vpcgate"
        };
        let (th_name, rest) = title[4..].split_once(' ').unwrap_or_default();
        assert_eq!(plain(th_name), *name, "{title}");
        // Section 8, a YYYY-MM-DD date (SOURCE_DATE_EPOCH's), the version.
        let date = rest.get(2..12).unwrap_or_default();
        let is_date = date.len() == 10
            && date.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                _ => b.is_ascii_digit(),
            });
        let want = format!("8 {date} \"{program} {}\"", env!("CARGO_PKG_VERSION"));
        assert!(
            is_date && rest.starts_with(&want),
            "{name}.8: {title}, expected .TH {name} {want}"
        );
    }
    let text = |name: &str| plain(pages.get(name).unwrap_or_else(|| panic!("no {name}.8")));
    let daemon = text("vpcgated");
    for needle in [
        "--nat-form",
        "--socket-group",
        "--listen-port",
        "IFNAME",
        "vpcgate(8)",
    ] {
        assert!(
            daemon.contains(needle),
            "vpcgated.8 does not mention {needle}:\n{daemon}"
        );
    }
    let cli = text("vpcgate");
    for needle in [
        "--socket",
        "VPCGATE_SOCKET",
        "vpcgate-advertise-routes(8)",
        "vpcgate-peer(8)",
    ] {
        assert!(
            cli.contains(needle),
            "vpcgate.8 does not mention {needle}:\n{cli}"
        );
    }
    assert!(text("vpcgate-advertise-routes").contains("--exit-node"));
    assert!(text("vpcgate-peer-add").contains("--accept-routes"));
    // Each vpcgate-*(8) a page names is shipped, and each shipped one is named.
    let mut named = BTreeSet::from(["vpcgate", "vpcgated"]);
    for roff in pages.values() {
        let roff = plain(roff);
        for (i, _) in roff.match_indices("(8)") {
            let start = roff[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .map_or(0, |j| j + 1);
            if let Some((name, _)) = pages.get_key_value(&roff[start..i]) {
                named.insert(name);
            } else {
                assert!(
                    !roff[start..i].starts_with("vpcgate"),
                    "{}(8) is named, but not in the package",
                    &roff[start..i]
                );
            }
        }
    }
    let shipped: BTreeSet<&str> = pages.keys().copied().collect();
    assert_eq!(shipped, named, "man pages that no page names");

    // What lintian runs (its manpages check), where man-db is installed.
    if Command::new("man").arg("--version").output().is_err() {
        eprintln!("man-db is not installed: the man pages' groff warnings are not checked");
        return;
    }
    for name in pages.keys() {
        let out = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(root.join(format!("{MAN_DIR}/{name}.8.gz")))
            .env("LC_ALL", "C.UTF-8")
            .env("MANROFFSEQ", "")
            .env("MANWIDTH", "80")
            .output()
            .expect("run man");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && warnings.trim().is_empty(),
            "man -l {name}.8.gz ({}):\n{warnings}",
            out.status
        );
    }
}

/// The completion scripts: the shell's own form, real subcommands and
/// options, nothing hidden, and bash's parses.
fn check_completions(root: &Path) {
    for name in ["vpcgated", "vpcgate"] {
        let [_, bash, zsh, fish] = docs_of(name);
        let read =
            |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        let (bash_text, zsh_text, fish_text) = (read(&bash), read(&zsh), read(&fish));
        assert!(
            bash_text.contains(&format!("complete -F _{name} ")),
            "{bash}:\n{bash_text}"
        );
        assert!(
            zsh_text.starts_with(&format!("#compdef {name}\n")),
            "{zsh}:\n{zsh_text}"
        );
        assert!(
            fish_text.contains(&format!("complete -c {name} ")),
            "{fish}:\n{fish_text}"
        );
        run(Command::new("bash").arg("-n").arg(root.join(&bash)));
        let real: &[&str] = match name {
            "vpcgated" => &["--nat-form", "--socket-group"],
            _ => &["advertise-routes", "peer", "accept-routes", "doctor"],
        };
        for (file, text) in [(&bash, &bash_text), (&zsh, &zsh_text), (&fish, &fish_text)] {
            for needle in real {
                let needle = needle.trim_start_matches('-');
                assert!(text.contains(needle), "{file} does not mention {needle}");
            }
            for hidden in ["generate-", "qr-decode"] {
                assert!(!text.contains(hidden), "{file} offers the hidden {hidden}");
            }
        }
    }
}

#[test]
fn amd64_package() {
    let deb = build_deb("amd64");
    check_deb("amd64", &deb);
    // Building again is safe, and gives the same bytes.
    let first = std::fs::read(&deb).expect("the .deb");
    let again = build_deb("amd64");
    assert_eq!(again, deb);
    assert!(
        std::fs::read(&again).expect("the .deb") == first,
        "a second build of the same tree gave a different package"
    );
}

#[test]
fn arm64_package() {
    let deb = build_deb("arm64");
    check_deb("arm64", &deb);
}

#[test]
fn unknown_architecture_is_refused_with_advice() {
    let out = Command::new("bash")
        .arg(repo_root().join("packaging/build-deb.sh"))
        .arg("riscv64")
        .output()
        .expect("run build-deb.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("amd64 or arm64"), "{stderr}");
}

#[test]
fn sysctl_file_turns_forwarding_on() {
    let path = repo_root().join("packaging/sysctl.d/90-vpcgate.conf");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let settings: BTreeMap<&str, &str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not key = value: {l}"));
            (k.trim(), v.trim())
        })
        .collect();
    assert_eq!(
        settings,
        BTreeMap::from([
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ])
    );
}

#[test]
fn cloud_init_user_data_is_valid() {
    let path = repo_root().join("packaging/cloud-init.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.starts_with("#cloud-config\n"),
        "cloud-init reads user data as cloud-config only after a #cloud-config first line"
    );
    // Well-formed YAML, and the shape cloud-init expects; prints the script.
    let script = run(Command::new("python3").arg("-c").arg(
        "import sys, yaml\n\
         d = yaml.safe_load(open(sys.argv[1]))\n\
         assert isinstance(d, dict), 'the top level is a mapping'\n\
         assert isinstance(d['runcmd'], list) and isinstance(d['packages'], list)\n\
         files = [f for f in d['write_files'] if f['path'] == '/usr/local/sbin/vpcgate-cloud-setup']\n\
         assert len(files) == 1 and files[0]['permissions'] == '0755'\n\
         assert any('vpcgate-cloud-setup' in str(c) for c in d['runcmd'])\n\
         sys.stdout.write(files[0]['content'])\n",
    )
    .arg(&path));
    let scratch = Scratch::new("cloud-init");
    let script_path = scratch.0.join("vpcgate-cloud-setup");
    std::fs::write(&script_path, &script).expect("write the script");
    run(Command::new("sh").arg("-n").arg(&script_path));
    for needle in [
        "VPCGATE_DEB_URL=",
        "VPCGATE_ROUTES=",
        "VPCGATE_PUBLIC_IP=",
        "dpkg --print-architecture",
        "vpcgate advertise-routes",
        "vpcgate set --public-endpoint",
    ] {
        assert!(script.contains(needle), "the setup script lacks {needle:?}");
    }
    // The operator's reminders: each provider's forwarding switch and UDP 51820.
    for needle in [
        "source/destination check",
        "--can-ip-forward",
        "IP forwarding",
        "UDP 51820",
    ] {
        assert!(
            text.contains(needle),
            "cloud-init.yaml does not mention {needle:?}"
        );
    }
    // Unfilled placeholders stop the script with advice, before it does anything.
    let out = Command::new("sh")
        .arg(&script_path)
        .output()
        .expect("run the setup script");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("fill in VPCGATE_DEB_URL"),
        "with placeholders left: {} {stderr}",
        out.status
    );
}
