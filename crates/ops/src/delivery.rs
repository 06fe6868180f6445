//! `billing delivery resolve`: the operator's answer for a delivery held `unknown`.
//!
//! A delivery is `unknown` when the process sending it died after calling a provider without
//! idempotency keys and before the answer was recorded (docs/architecture.md): the message
//! may have gone out, so the channel holds it rather than risk sending twice. The operator
//! checks the provider's log and answers:
//! - `sent`: the provider did send it. The delivery becomes `sent` (once per bill: refused if
//!   another channel already sent the bill), and the letter that held it is closed.
//! - `resend`: it did not. The delivery goes back to the attempt that was in flight (claimable
//!   again by exactly that attempt), and the letter that held it, which carries that attempt's
//!   request, is replayed to its topic.

use billing_runtime::CommonArgs;
use diesel::{
    OptionalExtension, QueryableByName,
    sql_types::{BigInt, Int4, Text},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::OpsError;

/// What the operator found at the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The provider sent the message.
    Sent,
    /// It did not: send it again.
    Resend,
}

/// What `resolve` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The held letter replayed (`resend`) or closed (`sent`), if there was one.
    pub letter: Option<i64>,
    /// The delivery's attempts now.
    pub attempts: i32,
}

#[derive(QueryableByName)]
struct Attempts {
    #[diesel(sql_type = Int4)]
    attempts: i32,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Resolves bill `bill_id`'s `unknown` delivery on `channel` (see the module docs).
pub async fn resolve(
    common: &CommonArgs,
    bill_id: i64,
    channel: &str,
    resolution: Resolution,
) -> Result<Resolved, OpsError> {
    if !matches!(channel, "email" | "sms") {
        return Err(OpsError::Invalid(format!(
            "channel must be email or sms, not {channel:?}"
        )));
    }
    let mut conn = billing_db::connect(&common.database_url).await?;
    let (channel_s, reason) = (channel.to_string(), held_reason(bill_id, channel));
    let (attempts, letter) = conn
        .transaction::<_, OpsError, _>(async move |conn: &mut AsyncPgConnection| {
            let attempts = reopen(conn, bill_id, &channel_s, resolution).await?;
            let letter: Option<Id> = diesel::sql_query(
                "update dead_letter set replayed_at = case when $3 then replayed_at else now() end
                 where id = (select id from dead_letter where stage = $1 and reason like $2
                             and replayed_at is null order by id desc limit 1)
                 returning id",
            )
            .bind::<Text, _>(&channel_s)
            .bind::<Text, _>(&reason)
            .bind::<diesel::sql_types::Bool, _>(resolution == Resolution::Resend)
            .get_result(conn)
            .await
            .optional()?;
            Ok((attempts, letter.map(|l| l.id)))
        })
        .await?;
    if resolution == Resolution::Resend {
        let Some(id) = letter else {
            return Err(OpsError::NotFound(format!(
                "bill {bill_id}'s {channel} delivery was reopened at {attempts} attempts, but no held letter carries its request: publish one to {channel}-requests"
            )));
        };
        crate::dlq::replay(common, &[id], 1).await?;
    }
    Ok(Resolved { letter, attempts })
}

/// The reason the channel gives the letter of a held delivery (`LIKE` pattern).
fn held_reason(bill_id: i64, channel: &str) -> String {
    format!("bill {bill_id} on {channel}: %held for an operator%")
}

/// Moves the `unknown` delivery to its resolution; returns its attempts.
async fn reopen(
    conn: &mut AsyncPgConnection,
    bill_id: i64,
    channel: &str,
    resolution: Resolution,
) -> Result<i32, OpsError> {
    let sql = match resolution {
        Resolution::Sent => {
            "update delivery set status = 'sent', sent_at = coalesce(sent_at, now()),
               claim_owner = null, claim_until = null, handover = null,
               last_error = 'resolved by an operator: the provider sent it', updated_at = now()
             where bill_id = $1 and channel = $2 and status = 'unknown' returning attempts"
        }
        // Back to the attempt that was in flight: its claim needs exactly that many attempts.
        Resolution::Resend => {
            "update delivery set attempts = attempts - 1,
               status = case when attempts - 1 = 0 then 'queued' else 'failed' end,
               claim_owner = null, claim_until = null, handover = null,
               last_error = 'resolved by an operator: send again', updated_at = now()
             where bill_id = $1 and channel = $2 and status = 'unknown' returning attempts"
        }
    };
    let row: Option<Attempts> = match diesel::sql_query(sql)
        .bind::<BigInt, _>(bill_id)
        .bind::<Text, _>(channel)
        .get_result(conn)
        .await
        .optional()
    {
        Err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _,
        )) => {
            return Err(OpsError::Invalid(format!(
                "bill {bill_id} was already sent on another channel"
            )));
        }
        other => other?,
    };
    row.map(|r| r.attempts).ok_or_else(|| {
        OpsError::NotFound(format!(
            "bill {bill_id} has no {channel} delivery in status unknown"
        ))
    })
}
