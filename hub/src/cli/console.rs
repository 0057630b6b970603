//! `hub console`: prints a one-time link that signs a browser in to the web console (as
//! Jupyter does), so the operator need not paste the admin token into a page.

use serde_json::{json, Value};

use super::{exit, ApiClient, CliError};

/// Asks the hub for a one-time sign-in code and prints the link, valid for 10 minutes and
/// for one sign-in.
///
/// # Errors
/// The hub is unreachable or refused the admin token.
pub fn run(api: &ApiClient) -> Result<u8, CliError> {
    let answer: Value = api.post("/api/v1/console/links", &json!({}))?;
    let path = answer["path"].as_str().unwrap_or("/");
    println!("Open the console (this link signs in once, within 10 minutes):");
    println!("    {}{path}", api.base().trim_end_matches('/'));
    println!(
        "Or open {}/ and sign in with the admin token.",
        api.base().trim_end_matches('/')
    );
    Ok(exit::OK)
}
