//! Load generator: starts ai-message in this process on a fresh database (or
//! targets `--url`), drives it with real tonic clients over a few HTTP/2
//! connections, and prints calls per second and latency percentiles per
//! scenario, with each throughput also as a percentage of the health Check.
//!
//!     cargo run --release --bin ai-message-bench -- [--seconds 5] [--concurrency 64]
//!         [--connections 4] [--scenarios health,getme,validate,send,list,login]
//!         [--database-url postgres://...]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ai_message::{
    config::{Config, DatabaseTarget},
    domain::Timestamp,
    proto::{
        self, auth_service_client::AuthServiceClient, message_service_client::MessageServiceClient,
    },
    startup::Application,
};
use tonic::{Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// mimalloc: many small short-lived allocations per call (protobuf strings,
/// rows), where it is measurably faster than glibc malloc (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Options {
    seconds: u64,
    concurrency: usize,
    connections: usize,
    scenarios: Vec<String>,
    database_url: Option<String>,
    bcrypt_cost: u32,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        seconds: 5,
        concurrency: 64,
        connections: 4,
        scenarios: ["health", "getme", "validate", "send", "list", "login"]
            .map(String::from)
            .to_vec(),
        database_url: None,
        bcrypt_cost: 12,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => options.seconds = value()?.parse().map_err(|_| "--seconds: a number")?,
            "--concurrency" => {
                options.concurrency = value()?.parse().map_err(|_| "--concurrency: a number")?
            }
            "--connections" => {
                options.connections = value()?.parse().map_err(|_| "--connections: a number")?
            }
            "--bcrypt-cost" => {
                options.bcrypt_cost = value()?.parse().map_err(|_| "--bcrypt-cost: a number")?
            }
            "--scenarios" => options.scenarios = value()?.split(',').map(str::to_owned).collect(),
            "--database-url" => options.database_url = Some(value()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(options)
}

/// Latencies of one scenario, in microseconds.
#[derive(Default)]
struct Sample {
    latencies: Vec<u64>,
    errors: u64,
    elapsed: Duration,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        self.latencies.sort_unstable();
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[index] as f64 / 1000.0
    }
}

/// Runs `concurrency` workers calling `call` for `duration`.
async fn drive<F, Fut>(concurrency: usize, duration: Duration, call: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let call = Arc::clone(&call);
            tokio::spawn(async move {
                let mut sample = Sample::default();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = call(worker, n).await;
                    n += 1;
                    if ok {
                        sample.latencies.push(t.elapsed().as_micros() as u64);
                    } else {
                        sample.errors += 1;
                    }
                }
                sample
            })
        })
        .collect();
    let mut total = Sample::default();
    for worker in workers {
        if let Ok(sample) = worker.await {
            total.latencies.extend(sample.latencies);
            total.errors += sample.errors;
        }
    }
    total.elapsed = started.elapsed();
    total
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Row {
    name: String,
    sample: Sample,
}

#[tokio::main]
async fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run_all(options).await {
        eprintln!("benchmark failed: {error:#}");
        std::process::exit(1);
    }
}

async fn run_all(options: Options) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ai-message-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let target = match &options.database_url {
        Some(url) => DatabaseTarget::parse(url)?,
        None => DatabaseTarget::Sqlite(Some(dir.join("bench.db"))),
    };
    let mut config = Config::for_tests(target.clone());
    config.bcrypt_cost = options.bcrypt_cost;
    // The Login flood measures bcrypt isolation, not the throttle.
    config.login_account_failures = 1_000_000_000;
    config.login_address_failures = 1_000_000_000;
    let app = Application::build(config).await?;
    let port = app.port();
    let state = app.state();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let idle_rss = peak_rss_mib();

    let mut channels = Vec::new();
    for _ in 0..options.connections.max(1) {
        channels.push(
            Channel::from_shared(format!("http://127.0.0.1:{port}"))?
                .connect()
                .await?,
        );
    }
    let channel = |worker: usize| channels[worker % channels.len()].clone();
    let mut auth = AuthServiceClient::new(channel(0));
    let password = "benchmark passphrase 1";
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    for i in 0..32 {
        let username = format!("bench{i}");
        let user = auth
            .register(proto::RegisterRequest {
                username: username.clone(),
                email: format!("{username}@example.com"),
                password: password.into(),
                full_name: None,
            })
            .await?
            .into_inner()
            .user
            .ok_or_else(|| anyhow::anyhow!("no user"))?;
        let login = auth
            .login(proto::LoginRequest {
                username,
                password: password.into(),
                device_info: None,
            })
            .await?
            .into_inner();
        tokens.push(login.access_token);
        ids.push(user.id);
    }
    let tokens = Arc::new(tokens);
    let ids = Arc::new(ids);
    let duration = Duration::from_secs(options.seconds);
    let concurrency = options.concurrency;
    let mut rows: Vec<Row> = Vec::new();

    for scenario in &options.scenarios {
        match scenario.as_str() {
            "health" => {
                let clients: Vec<_> = (0..concurrency)
                    .map(|w| HealthClient::new(channel(w)))
                    .collect();
                let sample = drive(concurrency, duration, move |w, _| {
                    let mut client = clients[w].clone();
                    async move {
                        client
                            .check(HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .is_ok()
                    }
                })
                .await;
                rows.push(Row {
                    name: "health Check".into(),
                    sample,
                });
            }
            "getme" => {
                let sample = get_me_load(&channels, &tokens, concurrency, duration).await;
                rows.push(Row {
                    name: "GetMe".into(),
                    sample,
                });
            }
            "validate" => {
                let clients: Vec<_> = (0..concurrency)
                    .map(|w| AuthServiceClient::new(channel(w)))
                    .collect();
                let tokens = Arc::clone(&tokens);
                let sample = drive(concurrency, duration, move |w, _| {
                    let mut client = clients[w].clone();
                    let token = tokens[w % tokens.len()].clone();
                    async move {
                        client
                            .validate_token(proto::ValidateTokenRequest { token })
                            .await
                            .is_ok_and(|r| r.into_inner().active)
                    }
                })
                .await;
                rows.push(Row {
                    name: "ValidateToken".into(),
                    sample,
                });
            }
            "send" => {
                let clients: Vec<_> = (0..concurrency)
                    .map(|w| MessageServiceClient::new(channel(w)))
                    .collect();
                let (tokens, ids) = (Arc::clone(&tokens), Arc::clone(&ids));
                let sample = drive(concurrency, duration, move |w, n| {
                    let mut client = clients[w].clone();
                    let from = w % tokens.len();
                    let to = (from + 1 + (n as usize % (ids.len() - 1))) % ids.len();
                    let request = bearer(
                        proto::SendMessageRequest {
                            recipient_id: ids[to],
                            content: "benchmark message".into(),
                            parent_id: None,
                            conversation_id: None,
                        },
                        &tokens[from],
                    );
                    async move { client.send_message(request).await.is_ok() }
                })
                .await;
                rows.push(Row {
                    name: "SendMessage".into(),
                    sample,
                });
            }
            "list" => {
                // One user with 10,000 messages, written straight to storage.
                let (reader, sender) = (ids[0], ids[1]);
                for i in 0..10_000 {
                    state
                        .db
                        .insert_message(ai_message::storage::NewMessage {
                            sender_id: sender,
                            recipient_id: reader,
                            content: format!("stored message {i}"),
                            parent_id: None,
                            conversation_id: ai_message::domain::message::default_conversation_id(
                                reader, sender,
                            ),
                            now: Timestamp::now().micros(),
                        })
                        .await?;
                }
                let clients: Vec<_> = (0..concurrency)
                    .map(|w| MessageServiceClient::new(channel(w)))
                    .collect();
                let token = tokens[0].clone();
                let sample = drive(concurrency, duration, move |w, _| {
                    let mut client = clients[w].clone();
                    let request = bearer(proto::ListMessagesRequest::default(), &token);
                    async move {
                        client
                            .list_messages(request)
                            .await
                            .is_ok_and(|r| r.into_inner().messages.len() == 50)
                    }
                })
                .await;
                rows.push(Row {
                    name: "ListMessages (10k, first page)".into(),
                    sample,
                });
            }
            "login" => {
                let one_hash = {
                    let started = Instant::now();
                    let _ = bcrypt::hash("measure one hash", options.bcrypt_cost);
                    started.elapsed()
                };
                let quiet = get_me_load(&channels, &tokens, 8, duration).await;
                let flood_clients: Vec<_> = (0..64)
                    .map(|w| AuthServiceClient::new(channel(w)))
                    .collect();
                let flood = tokio::spawn(drive(64, duration, move |w, n| {
                    let mut client = flood_clients[w].clone();
                    let request = proto::LoginRequest {
                        username: format!("bench{}", w % 32),
                        password: format!("wrong password {n}"),
                        device_info: None,
                    };
                    async move {
                        client
                            .login(request)
                            .await
                            .is_err_and(|s| s.code() == tonic::Code::Unauthenticated)
                    }
                }));
                let loaded = get_me_load(&channels, &tokens, 8, duration).await;
                let flood = flood.await?;
                let cores = std::thread::available_parallelism().map_or(2, usize::from) as f64;
                println!(
                    "bcrypt cost {}: one hash {:.1} ms; ceiling {:.1} logins/s on {cores} cores",
                    options.bcrypt_cost,
                    one_hash.as_secs_f64() * 1000.0,
                    cores / one_hash.as_secs_f64()
                );
                rows.push(Row {
                    name: "GetMe, 8 callers, quiet".into(),
                    sample: quiet,
                });
                rows.push(Row {
                    name: "Login flood (wrong pw, 64 callers)".into(),
                    sample: flood,
                });
                rows.push(Row {
                    name: "GetMe, 8 callers, during flood".into(),
                    sample: loaded,
                });
            }
            other => anyhow::bail!("unknown scenario {other}"),
        }
    }

    let floor = rows
        .iter()
        .find(|r| r.name == "health Check")
        .map(|r| r.sample.rate());
    println!(
        "\n{:<38} {:>10} {:>8} {:>9} {:>9} {:>9} {:>7}",
        "scenario", "calls/s", "% floor", "p50 ms", "p99 ms", "p99.9 ms", "errors"
    );
    for row in &mut rows {
        let rate = row.sample.rate();
        let share = floor.map_or("-".to_owned(), |f| format!("{:.0}%", rate / f * 100.0));
        println!(
            "{:<38} {:>10.0} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>7}",
            row.name,
            rate,
            share,
            row.sample.percentile(0.5),
            row.sample.percentile(0.99),
            row.sample.percentile(0.999),
            row.sample.errors
        );
    }
    println!(
        "\ndatabase {:?}; {} connections, {} callers, {} s per scenario; process RSS idle {:.1} MiB, peak {:.1} MiB (server and load generator together)",
        target,
        channels.len(),
        concurrency,
        options.seconds,
        idle_rss,
        peak_rss_mib()
    );
    let _ = stop.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn get_me_load(
    channels: &[Channel],
    tokens: &Arc<Vec<String>>,
    concurrency: usize,
    duration: Duration,
) -> Sample {
    let clients: Vec<_> = (0..concurrency)
        .map(|w| AuthServiceClient::new(channels[w % channels.len()].clone()))
        .collect();
    let tokens = Arc::clone(tokens);
    drive(concurrency, duration, move |w, _| {
        let mut client = clients[w].clone();
        let request = bearer(proto::GetMeRequest {}, &tokens[w % tokens.len()]);
        async move { client.get_me(request).await.is_ok() }
    })
    .await
}
