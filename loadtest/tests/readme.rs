//! The command lines of the README's "Load testing" section must parse and validate, so the
//! documentation cannot drift from the flags.

#![allow(clippy::unwrap_used)]

use clap::Parser;
use loadtest::cli::Args;

/// Splits a shell line into words, honouring single quotes (all the README uses) and dropping
/// a trailing `# comment`.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut word, mut quoted, mut in_word) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            '#' if !quoted && !in_word => break,
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                }
                in_word = false;
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

#[test]
fn readme_load_testing_commands_parse() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("## Load testing")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let block = section
        .split("```sh")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    // One command per `$LT` line, with its `\` continuations.
    let joined = block.replace("\\\n", " ");
    let commands: Vec<&str> = joined
        .lines()
        .filter(|l| l.trim_start().starts_with("$LT"))
        .collect();
    assert_eq!(commands.len(), 4, "{block}");
    for command in commands {
        let mut argv = words(command);
        argv[0] = "loadtest".into();
        let args = Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{command}: {e}"));
        args.into_config()
            .unwrap_or_else(|e| panic!("{command}: {e}"));
    }
}

#[test]
fn words_split_like_a_shell() {
    assert_eq!(
        words(r#"a 'b c' --x='{"k": 1}'  # note"#),
        vec!["a", "b c", r#"--x={"k": 1}"#]
    );
}
