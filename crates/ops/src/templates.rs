//! `billing template list|show|create|activate|preview`: versioned email and SMS templates.
//! A version is created inactive; activation validates its placeholders (unknown or missing
//! ones are refused there, never at send time) and makes it its channel's only active one.
//! Processors pick a change up within their settings cache time (10 s by default).

use billing_messaging::{
    store::{self, TemplateRow},
    template::{self, BillView},
};
use billing_runtime::CommonArgs;

use crate::OpsError;

/// Every version of every template.
pub async fn list(common: &CommonArgs) -> Result<Vec<TemplateRow>, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    Ok(store::list_templates(&mut conn).await?)
}

/// One version.
pub async fn show(common: &CommonArgs, id: i64) -> Result<TemplateRow, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    store::template(&mut conn, id)
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("no template {id}")))
}

/// Stores a new inactive version of `name` for `channel`. Its placeholders are parsed now
/// (an unclosed one is refused) and fully checked at activation.
pub async fn create(
    common: &CommonArgs,
    channel: &str,
    name: &str,
    subject: Option<&str>,
    body: &str,
) -> Result<TemplateRow, OpsError> {
    if template::placeholders_of(channel).is_none() {
        return Err(OpsError::Invalid(format!("unknown channel {channel:?}")));
    }
    template::placeholders(body).map_err(|e| OpsError::Invalid(e.to_string()))?;
    billing_db::migrate(&common.database_url).await?;
    let mut conn = billing_db::connect(&common.database_url).await?;
    Ok(store::create_template(&mut conn, channel, name, subject, body).await?)
}

/// Validates version `id` and makes it its channel's active template.
pub async fn activate(common: &CommonArgs, id: i64) -> Result<TemplateRow, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let t = store::template(&mut conn, id)
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("no template {id}")))?;
    template::validate(&t.channel, t.subject.as_deref(), &t.body).map_err(|e| {
        OpsError::Invalid(format!(
            "template {id} ({} {} v{}) cannot be activated: {e}",
            t.channel, t.name, t.version
        ))
    })?;
    store::activate_template(&mut conn, id).await?;
    store::template(&mut conn, id)
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("no template {id}")))
}

/// A rendered preview of version `id` (active or not) with a real bill (`bill_id`, or the
/// first bill there is): (subject, body) where body is HTML for email, text for SMS.
pub async fn preview(
    common: &CommonArgs,
    id: i64,
    bill_id: Option<i64>,
) -> Result<(Option<String>, String), OpsError> {
    let t = show(common, id).await?;
    let mut conn = billing_db::connect(&common.database_url).await?;
    let bill_id = match bill_id {
        Some(b) => b,
        None => first_bill(&mut conn).await?,
    };
    let bills = store::load_bills(&mut conn, &[bill_id], true).await?;
    let bill = bills
        .get(&bill_id)
        .ok_or_else(|| OpsError::NotFound(format!("no bill {bill_id}")))?;
    Ok(render(&t, &bill.view))
}

fn render(t: &TemplateRow, view: &BillView) -> (Option<String>, String) {
    if t.channel == "email" {
        let (subject, html) =
            template::render_email(t.subject.as_deref().unwrap_or_default(), &t.body, view);
        (Some(subject), html)
    } else {
        (None, template::render_sms(&t.body, view))
    }
}

async fn first_bill(conn: &mut diesel_async::AsyncPgConnection) -> Result<i64, OpsError> {
    use billing_db::schema::bill;
    use diesel::{OptionalExtension, QueryDsl};
    use diesel_async::RunQueryDsl;
    bill::table
        .select(bill::id)
        .order(bill::id)
        .first::<i64>(conn)
        .await
        .optional()?
        .ok_or_else(|| OpsError::NotFound("no bills to preview with".into()))
}
