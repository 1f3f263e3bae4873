//! Building and installing the subscriber; flushing on the way out.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use sandfleet_settings::{LogFormat, TelemetrySettings};
use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::TelemetryError;
use crate::console::{QuietStderr, use_colour};

/// Keeps the tracer provider alive; flushes buffered spans when dropped.
///
/// Prefer `guard.shutdown().await` at the end of `main`: dropping the guard
/// flushes too, but on a current-thread runtime it cannot wait for the
/// export (that would block the very thread the exporter runs on), so it
/// only flushes there when the guard is shut down explicitly.
#[must_use = "dropping the guard flushes and stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl TelemetryGuard {
    /// True when spans are exported over OTLP.
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes buffered spans and stops the exporter.
    pub async fn shutdown(mut self) -> Result<(), TelemetryError> {
        let Some(provider) = self.provider.take() else {
            return Ok(());
        };
        // The SDK's shutdown blocks until the batch task on the runtime has
        // exported; run it off the runtime's threads so that task can run.
        tokio::task::spawn_blocking(move || provider.shutdown())
            .await
            .map_err(|e| TelemetryError::Flush(e.to_string()))?
            .map_err(|e| TelemetryError::Flush(e.to_string()))
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        if !self.exporting {
            return;
        }
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                // Lets the runtime move other work (the batch task) elsewhere
                // while this thread waits for the flush.
                let _ = tokio::task::block_in_place(|| provider.shutdown());
            }
            // Current-thread runtime: waiting here would deadlock. The spans
            // not yet exported are lost unless `shutdown().await` was used.
            Ok(_) => {}
            // No runtime any more: the batch task is gone and shutdown
            // returns at once with an error; nothing to wait for.
            Err(_) => {
                let _ = provider.shutdown();
            }
        }
    }
}

/// Builds the subscriber [`init`] installs, without installing it: tests use
/// it with `tracing::subscriber::with_default`.
pub fn subscriber(
    settings: &TelemetrySettings,
) -> Result<(impl Subscriber + Send + Sync + 'static, TelemetryGuard), TelemetryError> {
    let filter = EnvFilter::try_new(with_library_defaults(&settings.log_filter))
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    // Colours only for a person at a terminal, not in collected pod logs.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(QuietStderr)
        .log_internal_errors(false);
    let fmt = match settings.log_format {
        LogFormat::Human => fmt.with_ansi(use_colour()).boxed(),
        LogFormat::Json => fmt
            .with_ansi(false)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };

    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let exporting = match settings.otlp_endpoint.as_deref() {
        Some(endpoint) => {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(TelemetryError::NoRuntime);
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(traces_url(endpoint))
                .with_timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let processor =
                BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
            builder = builder.with_span_processor(processor);
            true
        }
        // No exporter: spans still get trace ids (for propagation), and end
        // without being sent anywhere.
        None => false,
    };
    let provider = builder.build();
    let tracer = provider.tracer("sandfleet");
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);

    let subscriber = Registry::default().with(fmt).with(otel).with(filter);
    let guard = TelemetryGuard {
        provider: Some(provider),
        exporting,
    };
    Ok((subscriber, guard))
}

/// Installs the global subscriber and trace propagator described by
/// `settings`. Call once, early in `main`, inside the Tokio runtime when an
/// OTLP endpoint is configured.
pub fn init(settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    let (subscriber, guard) = subscriber(settings)?;
    // try_init also routes `log` records (rustls, some client crates) into tracing.
    subscriber
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialized)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(provider) = &guard.provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    Ok(guard)
}

/// Installs a plain log subscriber for a short command: `filter` (env-filter
/// syntax), human lines on stderr, coloured only on a terminal, no span
/// export. Installing twice is not an error (the first one stays).
pub fn init_console(filter: &str) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(with_library_defaults(filter))
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(QuietStderr)
        .with_ansi(use_colour())
        .log_internal_errors(false)
        .try_init();
    Ok(())
}

/// `filter` plus `lapin=off` unless it names lapin itself.
///
/// lapin logs every connection or channel the broker closes at ERROR level
/// (three lines per refused login, one per expected 404 of a passive
/// declare), and sandfleet gets each of those errors as a value, which it
/// reports with what it means (once per outage interval while retrying, or
/// as the command's own answer). `--log info,lapin=debug` brings them back.
pub fn with_library_defaults(filter: &str) -> String {
    if filter.contains("lapin") {
        filter.to_owned()
    } else {
        format!("{filter},lapin=off")
    }
}

/// The OTLP/HTTP traces URL: `http://collector:4318` becomes
/// `http://collector:4318/v1/traces`; a URL with a path is used as given.
fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest);
    if after_scheme.contains('/') {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

#[cfg(test)]
mod tests {
    use super::{traces_url, with_library_defaults};

    #[test]
    fn lapin_is_quiet_unless_the_filter_asks_for_it() {
        assert_eq!(with_library_defaults("info"), "info,lapin=off");
        assert_eq!(
            with_library_defaults("info,lapin=debug"),
            "info,lapin=debug"
        );
    }

    #[test]
    fn a_bare_collector_address_gets_the_traces_path() {
        assert_eq!(traces_url("http://otel:4318"), "http://otel:4318/v1/traces");
        assert_eq!(
            traces_url("http://otel:4318/"),
            "http://otel:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://x.example/otlp/v1/traces"),
            "https://x.example/otlp/v1/traces"
        );
    }
}
