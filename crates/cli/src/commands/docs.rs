//! `sandfleet completions SHELL` and `sandfleet man`: generated from the clap
//! definition ([`Cli`]), so they always agree with `--help`.

use clap::CommandFactory;

use crate::args::{Cli, CompletionsArgs, ManArgs};
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

/// Prints the completion script for `a.shell`.
pub fn completions(a: &CompletionsArgs, out: Output) -> Exit {
    let mut cmd = Cli::command();
    // Into a buffer first: the generator panics on a failed write, and a
    // closed stdout must end the command quietly.
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "sandfleet", &mut buf);
    out.human(String::from_utf8_lossy(&buf).trim_end());
    Exit::Ok
}

/// Prints the main man page, or writes every page to `a.out_dir`.
pub fn man(a: &ManArgs, out: Output) -> CliResult<Exit> {
    let cmd = Cli::command();
    match &a.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
            clap_mangen::generate_to(cmd, dir)
                .map_err(|e| CliError::Failed(format!("{}: {e}", dir.display())))?;
            out.human(format!("man pages written to {}", dir.display()));
        }
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut buf)
                .map_err(|e| CliError::Failed(format!("rendering the man page: {e}")))?;
            out.human(String::from_utf8_lossy(&buf).trim_end());
        }
    }
    Ok(Exit::Ok)
}
