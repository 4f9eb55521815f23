//! Captures the server's logs (every test's, in this process) so tests can
//! assert on audit events and on what never appears.

use std::{
    io::Write,
    sync::{Mutex, OnceLock},
};

static BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

fn buffer() -> &'static Mutex<Vec<u8>> {
    BUFFER.get_or_init(|| Mutex::new(Vec::new()))
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        buffer().lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (once per process); call it before the
/// actions whose logs the test reads.
pub fn capture() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_writer(|| Capture)
            .with_ansi(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

/// Everything logged so far.
pub fn text() -> String {
    String::from_utf8_lossy(&buffer().lock().unwrap()).into_owned()
}

mod tracing_ids {
    use ai_message::proto;
    use tonic::{Code, Request};

    use crate::helpers::{Backend, assert_code, spawn_app};

    backend_tests!(a_traceparent_s_trace_id_is_on_every_log_line_of_its_call);

    async fn a_traceparent_s_trace_id_is_on_every_log_line_of_its_call(backend: Backend) {
        super::capture();
        let app = spawn_app(backend).await;
        app.register("ivy").await;
        // A fresh trace id per test run, so parallel tests cannot match it.
        let trace = uuid::Uuid::new_v4().simple().to_string();
        let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
        // Over gRPC: a failed login logs its audit line and its call line.
        let mut request = Request::new(proto::LoginRequest {
            username: "ivy".into(),
            password: "wrong".into(),
            device_info: None,
        });
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        assert_code(app.auth.clone().login(request).await, Code::Unauthenticated);
        let logs = super::text();
        let lines: Vec<&str> = logs.lines().filter(|line| line.contains(&trace)).collect();
        assert!(
            lines.iter().any(|line| line.contains("login failed")),
            "the handler's audit line carries the trace id: {lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|line| line.contains("code=Unauthenticated")),
            "the call's own line too: {lines:#?}"
        );
        assert!(
            lines.iter().all(|line| line.contains("request_id=")),
            "beside the request id: {lines:#?}"
        );
        // Over REST, from the HTTP header.
        let rest_trace = uuid::Uuid::new_v4().simple().to_string();
        let answer = crate::rest::Rest::send(
            crate::rest::Rest::new(&app)
                .request("GET", "/auth/me", Some("forged"))
                .header(
                    "traceparent",
                    format!("00-{rest_trace}-00f067aa0ba902b7-01"),
                ),
        )
        .await;
        assert_eq!(answer.status, 401);
        assert!(
            super::text()
                .lines()
                .any(|line| line.contains(&rest_trace) && line.contains("GetMe")),
            "the REST call's line carries its trace id"
        );
        // Without one, a call still gets a trace id of its own.
        assert_code(app.get_me("forged").await, Code::Unauthenticated);
        let logs = super::text();
        let calls: Vec<&str> = logs.lines().filter(|line| line.contains("call{")).collect();
        assert!(!calls.is_empty());
        assert!(
            calls.iter().all(|line| line.contains("trace_id=")),
            "every call's lines carry a trace id"
        );
        app.stop().await;
    }
}
