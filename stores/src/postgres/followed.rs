//! Settings a process keeps in memory and reloads whenever PostgreSQL announces a change on a
//! channel (and every [`RELOAD_EVERY`] besides): feature flags, CORS origins. A [`Snapshot`]
//! says how to load one; [`Followed`] holds the one in force.

use std::{
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Result;

/// How often a snapshot is reloaded even when no change was announced (a missed notification
/// costs at most this long).
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Settings loaded whole from PostgreSQL, with the channel their changes are announced on.
pub trait Snapshot: Default + Send + Sync + Sized + 'static {
    /// The `NOTIFY` channel.
    const CHANNEL: &'static str;
    /// What they are, for the log.
    const WHAT: &'static str;
    /// Loads them (runtime role).
    fn load(app: &PgPool) -> impl Future<Output = Result<Self>> + Send;
}

/// The snapshot in force in this process, kept current by [`Followed::follow`].
#[derive(Default)]
pub struct Followed<T> {
    current: RwLock<Arc<T>>,
}

impl<T: Snapshot> Followed<T> {
    /// The settings as they are in PostgreSQL now.
    pub async fn load(app: &PgPool) -> Result<Arc<Self>> {
        let followed = Arc::new(Self {
            current: RwLock::new(Arc::new(T::default())),
        });
        followed.replace(T::load(app).await?);
        Ok(followed)
    }

    fn replace(&self, settings: T) {
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(settings);
        }
    }

    /// The settings now.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .map(|current| current.clone())
            .unwrap_or_default()
    }

    /// Reloads the settings whenever a change is announced, and every [`RELOAD_EVERY`], until
    /// `cancel` fires.
    pub async fn follow(self: Arc<Self>, app: PgPool, cancel: CancellationToken) {
        loop {
            let Some(mut listener) = super::listen(&app, T::CHANNEL, T::WHAT, &cancel).await else {
                return;
            };
            loop {
                match T::load(&app).await {
                    Ok(settings) => self.replace(settings),
                    Err(error) => tracing::warn!(%error, "reloading {} failed", T::WHAT),
                }
                let heard = tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RELOAD_EVERY) => Ok(None),
                    heard = listener.try_recv() => heard,
                };
                if let Err(error) = heard {
                    tracing::warn!(%error, "listening for {} failed; reconnecting", T::WHAT);
                    break;
                }
            }
        }
    }
}
