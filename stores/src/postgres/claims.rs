//! Claims: a name held by one process at a time, with a PostgreSQL advisory lock on a
//! connection the claimant keeps open. A process that dies loses its connection and with it
//! the claim, so the next one can take it; nothing needs cleaning up.

use sqlx::{PgConnection, PgPool};

use crate::Result;

/// A claim, held for as long as this value lives.
pub struct Claim {
    /// The connection holding the lock (dropped with the claim, which frees it).
    _connection: PgConnection,
    /// Which of the candidates was claimed.
    pub index: usize,
}

impl Claim {
    /// Whether the claim still holds: its connection answers and still holds an advisory lock.
    /// A connection PostgreSQL dropped (a restart, a network cut, an operator's
    /// `pg_terminate_backend`) took the lock with it, and another process may hold it now.
    pub async fn still_held(&mut self) -> bool {
        let held: std::result::Result<bool, sqlx::Error> = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND granted",
        )
        .fetch_one(&mut self._connection)
        .await;
        held.unwrap_or(false)
    }
}

/// Claims the first of `candidates` no other process holds; `None` if all are held.
pub async fn claim_first_free(pool: &PgPool, candidates: &[String]) -> Result<Option<Claim>> {
    let mut connection = pool.acquire().await?.detach();
    for (index, name) in candidates.iter().enumerate() {
        let claimed: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(name)
            .fetch_one(&mut connection)
            .await?;
        if claimed {
            return Ok(Some(Claim {
                _connection: connection,
                index,
            }));
        }
    }
    Ok(None)
}
