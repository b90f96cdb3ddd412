//! Manual pages and shell completion scripts, generated from a binary's own
//! clap definitions.
//!
//! `vpcgated` and `vpcgate` each hand their `clap::Command` to this crate
//! behind an option of their own, so what the package ships describes exactly
//! the interface the binary parses (`packaging/build-deb.sh` runs them).
//! [`man_pages`] and [`completion`] only build bytes; [`write_man_pages`] is
//! the file-writing shell around the first.

use std::path::{Path, PathBuf};

use clap::Command;
use clap_mangen::roff::{bold, roman, Inline, Roff};
use clap_mangen::Man;

pub use clap_complete::Shell;

/// One rendered manual page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManPage {
    /// The file name, such as `vpcgate-peer-add.8` (uncompressed).
    pub file_name: String,
    /// The page's roff source.
    pub roff: Vec<u8>,
}

/// The manual page of `cmd`, in `section`, and one for each of its visible
/// subcommands at any depth (`vpcgate-peer-add` for `vpcgate peer add`): the
/// top page's SUBCOMMANDS section refers to those by name. Hidden arguments
/// and subcommands are left out, as in `--help`. `date` (YYYY-MM-DD, see
/// [`man_date`]) goes in each page's footer. The top page's SEE ALSO lists
/// `see_also` (pages such as `wg(8)`); a subcommand's lists its parent.
pub fn man_pages(
    cmd: Command,
    section: &str,
    date: &str,
    see_also: &[&str],
) -> std::io::Result<Vec<ManPage>> {
    // Each subcommand has a page of its own, so `help` would only repeat
    // them.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    // Subcommands have no version of their own; every page names the
    // program's.
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    let see_also: Vec<String> = see_also.iter().map(|s| s.to_string()).collect();
    let mut pages = Vec::new();
    let page = Page {
        section,
        date,
        source: &source,
    };
    add_pages(&cmd, &page, &see_also, &mut pages)?;
    Ok(pages)
}

/// What every page of one program shares: the arguments of its `.TH` line.
struct Page<'a> {
    section: &'a str,
    date: &'a str,
    source: &'a str,
}

fn add_pages(
    cmd: &Command,
    page: &Page,
    see_also: &[String],
    pages: &mut Vec<ManPage>,
) -> std::io::Result<()> {
    // clap_mangen writes an empty date as nothing at all, which shifts the
    // source into the date's place on the .TH line.
    let man = Man::new(cmd.clone())
        .section(page.section)
        .date(page.date)
        .source(page.source);
    let mut roff = Vec::new();
    man.render(&mut roff)?;
    if !see_also.is_empty() {
        let mut refs: Vec<Inline> = Vec::new();
        for (i, page) in see_also.iter().enumerate() {
            if i > 0 {
                refs.push(roman(", "));
            }
            match page.split_once('(') {
                Some((name, rest)) => {
                    refs.push(bold(name));
                    refs.push(roman(format!("({rest}")));
                }
                None => refs.push(bold(page.as_str())),
            }
        }
        // to_roff: the page already defines the apostrophe string that
        // to_writer would define again.
        let section = Roff::default()
            .control("SH", ["SEE ALSO"])
            .text(refs)
            .to_roff();
        roff.extend_from_slice(section.as_bytes());
    }
    pages.push(ManPage {
        file_name: man.get_filename(),
        roff,
    });
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let parent = [format!("{name}({})", page.section)];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        add_pages(sub, page, &parent, pages)?;
    }
    Ok(())
}

/// Why [`write_man_pages`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("SOURCE_DATE_EPOCH is {0:?}, not a number of seconds since 1970")]
    SourceDateEpoch(String),
    #[error("cannot write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Writes [`man_pages`] into `dir` (created if missing) and returns their
/// paths. They are dated SOURCE_DATE_EPOCH where that is set, as
/// reproducible builds ask, else today.
pub fn write_man_pages(
    cmd: Command,
    section: &str,
    see_also: &[&str],
    dir: &Path,
) -> Result<Vec<PathBuf>, Error> {
    let seconds = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| Error::SourceDateEpoch(text))?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |error| Error::Write { path, error }
    };
    let pages = man_pages(cmd, section, &man_date(seconds), see_also).map_err(write_error(dir))?;
    std::fs::create_dir_all(dir).map_err(write_error(dir))?;
    let mut written = Vec::new();
    for page in pages {
        let path = dir.join(&page.file_name);
        std::fs::write(&path, &page.roff).map_err(write_error(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// `seconds` since the Unix epoch as a man page date, YYYY-MM-DD (UTC).
pub fn man_date(seconds: u64) -> String {
    // Howard Hinnant's days_from_civil, inverted
    // (https://howardhinnant.github.io/date_algorithms.html#civil_from_days),
    // for days on or after 1970-01-01.
    let days = seconds / 86_400 + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The completion script of `cmd` for `shell`, without the hidden arguments
/// and subcommands.
pub fn completion(cmd: &Command, shell: Shell) -> Vec<u8> {
    let mut cmd = visible(cmd);
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    // Into memory: clap_complete panics on a failed write, and the caller's
    // stdout may be a closed pipe.
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    script
}

/// A copy of `cmd` (not yet built) with only what --help shows: clap_complete
/// offers every argument and subcommand it is given, hidden ones too
/// (clap-rs/clap#1335), and clap cannot remove one from a command. Only what
/// completion scripts read is copied.
fn visible(cmd: &Command) -> Command {
    let mut copy = Command::new(cmd.get_name().to_string())
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(visible),
        )
        .visible_aliases(
            cmd.get_visible_aliases()
                .map(|alias| alias.to_string())
                .collect::<Vec<_>>(),
        )
        .disable_help_subcommand(cmd.is_disable_help_subcommand_set());
    if let Some(version) = cmd.get_version() {
        copy = copy.version(version.to_string());
    }
    if let Some(about) = cmd.get_about() {
        copy = copy.about(about.clone());
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn example() -> Command {
        Command::new("tool")
            .version("1.2.3")
            .about("Does things")
            .arg(
                Arg::new("socket")
                    .long("socket")
                    .env("TOOL_SOCKET")
                    .global(true),
            )
            .arg(
                Arg::new("secret-flag")
                    .long("secret-flag")
                    .hide(true)
                    .action(ArgAction::SetTrue),
            )
            .subcommand(
                Command::new("peer")
                    .about("Peers")
                    .subcommand(
                        Command::new("add")
                            .about("Add a peer")
                            .arg(Arg::new("public-key").long("public-key")),
                    )
                    .subcommand(Command::new("list").about("List peers")),
            )
            .subcommand(Command::new("internal").hide(true))
    }

    fn text(bytes: &[u8]) -> String {
        // roff spells a hyphen-minus \-.
        String::from_utf8_lossy(bytes).replace("\\-", "-")
    }

    #[test]
    fn a_page_for_the_command_and_each_visible_subcommand() {
        let pages = man_pages(example(), "8", "2024-02-29", &["wg(8)"]).expect("render");
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "tool.8",
                "tool-peer.8",
                "tool-peer-add.8",
                "tool-peer-list.8"
            ]
        );
        let top = text(&pages[0].roff);
        let th = ".TH tool 8 2024-02-29 \"tool 1.2.3\"";
        assert!(top.lines().any(|l| l.starts_with(th)), "{top}");
        assert!(top.contains("--socket"), "{top}");
        assert!(top.contains("TOOL_SOCKET"), "{top}");
        assert!(top.contains("tool-peer(8)"), "{top}");
        assert!(top.contains(".SH \"SEE ALSO\"\n\\fBwg\\fR(8)"), "{top}");
        for hidden in ["secret-flag", "internal", "tool-help"] {
            assert!(!top.contains(hidden), "{hidden} in {top}");
        }
        let add = text(&pages[2].roff);
        assert!(
            add.contains(".TH tool-peer-add 8 2024-02-29 \"tool 1.2.3\""),
            "{add}"
        );
        assert!(add.contains("tool peer add"), "the synopsis: {add}");
        assert!(
            add.contains("--public-key") && add.contains("--socket"),
            "{add}"
        );
        assert!(add.contains("\\fBtool-peer\\fR(8)"), "{add}");
    }

    #[test]
    fn man_dates() {
        assert_eq!(man_date(0), "1970-01-01");
        assert_eq!(man_date(951_782_400), "2000-02-29");
        assert_eq!(man_date(1_709_251_199), "2024-02-29");
        assert_eq!(man_date(1_709_251_200), "2024-03-01");
        assert_eq!(man_date(4_102_444_800), "2100-01-01");
    }

    #[test]
    fn completions_leave_out_what_help_hides() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completion(&example(), shell)).expect("UTF-8");
            for shown in ["peer", "add", "public-key", "socket"] {
                assert!(script.contains(shown), "{shell}: no {shown} in {script}");
            }
            for hidden in ["secret-flag", "internal"] {
                assert!(!script.contains(hidden), "{shell}: {hidden} in {script}");
            }
        }
    }
}
