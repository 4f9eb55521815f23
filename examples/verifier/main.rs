//! An example service-side verifier: verifies the access tokens given on
//! standard input (one a line) offline against a running ai-message, and
//! follows its revocation feed meanwhile.
//!
//!     cargo run --example verifier -- http://127.0.0.1:8000 localhost svc 'service password'
//!
//! (the account must hold the `service` role, or be a superuser). Each line
//! answered is `ok user=<id> session=<id>` or `refused <why>`.

#![allow(clippy::disallowed_methods)]

mod verifier;

use std::io::BufRead as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: verifier <server url> <issuer> <service username> <password>";
    let (Some(url), Some(issuer), Some(username), Some(password)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;
    let verifier = verifier::Verifier::new(channel, &issuer).await?;
    tokio::spawn(std::sync::Arc::clone(&verifier).follow(username, password));
    // Tokens as they come, from a thread that reads standard input.
    let (lines, mut tokens) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(token) = tokens.recv().await {
        match verifier.verify_or_refresh(token.trim()).await {
            Ok(verified) => println!(
                "ok user={} session={}",
                verified.user_id, verified.session_id
            ),
            Err(refused) => println!("refused {refused:?}"),
        }
    }
    Ok(())
}
