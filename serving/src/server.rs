//! Starting and stopping a gRPC service the same way in both binaries: TLS from PEM
//! files, the bound address announced on stdout, health for `""` and the service's
//! own name, reflection, and SIGTERM/SIGINT as the signal to drain.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::TlsConfig;

/// rustls panics at the first handshake when more than one crypto provider is
/// compiled in (tonic brings ring, object_store's HTTP client aws-lc-rs) and none was
/// chosen. Choose ring, once per process; a provider already installed is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A server builder, with TLS when configured. Certificates are read first, so a bad
/// one stops the start before any address is announced.
pub fn builder(tls: Option<&TlsConfig>) -> anyhow::Result<Server> {
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        install_crypto_provider();
        let cert = std::fs::read(&tls.cert)
            .map_err(|e| anyhow::anyhow!("tls.cert {}: {e}", tls.cert.display()))?;
        let key = std::fs::read(&tls.key)
            .map_err(|e| anyhow::anyhow!("tls.key {}: {e}", tls.key.display()))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| anyhow::anyhow!("tls: {e}"))?;
    }
    Ok(builder)
}

/// Binds `listen` and prints `listening on ADDR` on stdout: with port 0 it is how a
/// supervisor (or a test) learns the port.
pub async fn bind_announced(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen {listen}: {e}"))?;
    let address = listener
        .local_addr()
        .map_err(|e| anyhow::anyhow!("listen {listen}: {e}"))?;
    println!("listening on {address}");
    tracing::info!(%address, "gRPC listening");
    Ok(listener)
}

/// Prints `metrics on ADDR` on stdout, like the gRPC address.
pub fn announce_metrics(address: SocketAddr) {
    println!("metrics on {address}");
    tracing::info!(%address, "metrics listening");
}

/// Health as probes see it: the whole server (`""`) and `service` report the same.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl Health {
    /// The reporter, NOT_SERVING until [`Health::set`] says otherwise, and the health
    /// service to add to the server.
    pub async fn new(
        service: &'static str,
    ) -> (
        Health,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let health = Health { reporter, service };
        health.set(ServingStatus::NotServing).await;
        (health, server)
    }

    pub async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }
}

/// Reflection over coreg's and health's descriptors, for grpcurl and friends.
pub fn reflection(
    descriptor_sets: &[&'static [u8]],
) -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for set in descriptor_sets {
        builder = builder.register_encoded_file_descriptor_set(set);
    }
    builder
        .build_v1()
        .map_err(|e| anyhow::anyhow!("reflection: {e}"))
}

/// Resolves on SIGTERM or SIGINT (never, if the handlers cannot be installed).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
