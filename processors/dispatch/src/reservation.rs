//! Reservations: an operator registers an instant and a scope (a month, a list of members, or
//! both); the first pass at or after that instant fires it, once (`fired_at`). From then on the
//! bills in its scope are due whatever their delivery day; members inside their
//! do-not-disturb window, or everyone in quiet hours, are still held and go out with the first
//! pass after the window.

use billing_db::schema::dispatch_reservation;
use chrono::{DateTime, Utc};
use diesel::{
    ExpressionMethods, OptionalExtension, QueryDsl, Queryable, Selectable, SelectableHelper,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::DispatchError;

/// What a reservation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Only bills of this month (`YYYY-MM`), when set.
    pub billing_month: Option<String>,
    /// Only these members' bills, when set.
    pub member_ids: Option<Vec<i64>>,
}

impl Scope {
    /// Checks the scope names something and names it well.
    pub fn validate(&self) -> Result<(), DispatchError> {
        if self.billing_month.is_none() && self.member_ids.is_none() {
            return Err(DispatchError::Invalid(
                "a reservation needs a month, members, or both".into(),
            ));
        }
        if let Some(m) = &self.billing_month {
            let ok = m.len() == 7
                && chrono::NaiveDate::parse_from_str(&format!("{m}-01"), "%Y-%m-%d").is_ok();
            if !ok {
                return Err(DispatchError::Invalid(format!(
                    "billing month {m:?} is not YYYY-MM"
                )));
            }
        }
        if let Some(ids) = &self.member_ids {
            if ids.is_empty() {
                return Err(DispatchError::Invalid("the member list is empty".into()));
            }
            if let Some(bad) = ids.iter().find(|id| **id <= 0) {
                return Err(DispatchError::Invalid(format!(
                    "member id {bad} is not positive"
                )));
            }
        }
        Ok(())
    }
}

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = dispatch_reservation)]
pub struct Reservation {
    pub id: i64,
    pub fire_at: DateTime<Utc>,
    pub billing_month: Option<String>,
    pub member_ids: Option<Vec<i64>>,
    pub created_at: DateTime<Utc>,
    pub fired_at: Option<DateTime<Utc>>,
    /// The pass that fired it.
    pub pass_id: Option<i64>,
    pub note: Option<String>,
}

/// Registers a reservation firing at `fire_at`.
pub async fn reserve(
    conn: &mut AsyncPgConnection,
    fire_at: DateTime<Utc>,
    scope: Scope,
    note: Option<String>,
) -> Result<Reservation, DispatchError> {
    scope.validate()?;
    Ok(diesel::insert_into(dispatch_reservation::table)
        .values((
            dispatch_reservation::fire_at.eq(fire_at),
            dispatch_reservation::billing_month.eq(scope.billing_month),
            dispatch_reservation::member_ids.eq(scope.member_ids),
            dispatch_reservation::note.eq(note),
        ))
        .returning(Reservation::as_returning())
        .get_result(conn)
        .await?)
}

/// Reservations, oldest fire time first; fired ones too when `all`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    all: bool,
) -> Result<Vec<Reservation>, DispatchError> {
    let mut q = dispatch_reservation::table
        .select(Reservation::as_select())
        .order((dispatch_reservation::fire_at, dispatch_reservation::id))
        .into_boxed();
    if !all {
        q = q.filter(dispatch_reservation::fired_at.is_null());
    }
    Ok(q.load(conn).await?)
}

/// Cancels a reservation that has not fired; false when there is none such.
pub async fn cancel(conn: &mut AsyncPgConnection, id: i64) -> Result<bool, DispatchError> {
    let n = diesel::delete(
        dispatch_reservation::table
            .filter(dispatch_reservation::id.eq(id))
            .filter(dispatch_reservation::fired_at.is_null()),
    )
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// The earliest time a reservation not yet fired is due.
pub async fn next_fire_at(
    conn: &mut AsyncPgConnection,
) -> Result<Option<DateTime<Utc>>, DispatchError> {
    Ok(dispatch_reservation::table
        .filter(dispatch_reservation::fired_at.is_null())
        .select(dispatch_reservation::fire_at)
        .order(dispatch_reservation::fire_at)
        .first(conn)
        .await
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_checked() {
        let s = |m: Option<&str>, ids: Option<Vec<i64>>| Scope {
            billing_month: m.map(str::to_string),
            member_ids: ids,
        };
        assert!(s(Some("2026-11"), None).validate().is_ok());
        assert!(s(None, Some(vec![1, 2])).validate().is_ok());
        assert!(s(None, None).validate().is_err());
        assert!(s(Some("2026-13"), None).validate().is_err());
        assert!(s(Some("2026-1"), None).validate().is_err());
        assert!(s(None, Some(vec![])).validate().is_err());
        assert!(s(None, Some(vec![0])).validate().is_err());
    }
}
