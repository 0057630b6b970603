//! Reading the project's documentation for the tests that run what it says: the shell
//! blocks of a Markdown section.

/// The fenced `sh` blocks of the Markdown section headed `## {title}` (up to the next
/// `## ` heading), in order, each as its lines joined with newlines.
///
/// # Panics
/// When there is no such section or a block is not closed: the test names the document.
pub fn sh_blocks(markdown: &str, title: &str) -> Vec<String> {
    let heading = format!("## {title}\n");
    let start = markdown
        .find(&heading)
        .unwrap_or_else(|| panic!("no section {title:?}"))
        + heading.len();
    let section = &markdown[start..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in section.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), text) => {
                block.push_str(text);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "unterminated block in {title:?}");
    blocks
}

/// The files git would pick up in the repository at `dir`: untracked and not ignored.
///
/// # Panics
/// When git cannot run there.
pub fn untracked(dir: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=all"])
        .current_dir(dir)
        .output()
        .expect("git (./run-tests installs it)");
    assert!(
        out.status.success(),
        "git status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("?? "))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_one_section_only() {
        let md =
            "# T\n## A\ntext\n```sh\none\ntwo\n```\n```toml\nx = 1\n```\n## B\n```sh\nthree\n```\n";
        assert_eq!(sh_blocks(md, "A"), ["one\ntwo\n"]);
        assert_eq!(sh_blocks(md, "B"), ["three\n"]);
    }
}
