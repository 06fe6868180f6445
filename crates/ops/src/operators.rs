//! Console accounts: `billing operator add NAME --role viewer|operator` (the password read from
//! standard input), and the password check the console's login uses. Passwords are stored
//! only as salted argon2id hashes (PHC strings); a wrong password and an unknown name are
//! answered the same way, after the same work, so a login cannot tell which names exist.

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier, password_hash::SaltString};
use billing_runtime::CommonArgs;
use diesel::{OptionalExtension, QueryableByName, sql_types::Text};
use diesel_async::RunQueryDsl;

use crate::OpsError;

/// What an account may do on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees every page, changes nothing.
    Viewer,
    /// Also dispatches, edits, replays and resolves.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = OpsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            other => Err(OpsError::Invalid(format!(
                "role must be viewer or operator, not {other:?}"
            ))),
        }
    }
}

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 12;

/// Creates account `name` with `role`. Names are lower-case letters, digits, `.`, `_`, `-`
/// (at most 63, starting with a letter or digit); a name already taken is refused.
pub async fn add(
    common: &CommonArgs,
    name: &str,
    role: Role,
    password: &str,
) -> Result<(), OpsError> {
    let valid_name = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if !valid_name {
        return Err(OpsError::Invalid(format!(
            "{name:?} is not an account name (a-z, 0-9, '.', '_', '-'; at most 63)"
        )));
    }
    if password.chars().count() < MIN_PASSWORD {
        return Err(OpsError::Invalid(format!(
            "the password must have at least {MIN_PASSWORD} characters"
        )));
    }
    let salt = new_salt()?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| OpsError::Invalid(format!("cannot hash the password: {e}")))?
        .to_string();
    billing_db::migrate(&common.database_url).await?;
    let mut conn = billing_db::connect(&common.database_url).await?;
    let inserted = diesel::sql_query(
        "insert into operator (name, role, password_hash) values ($1, $2, $3)
         on conflict (name) do nothing",
    )
    .bind::<Text, _>(name)
    .bind::<Text, _>(role.as_str())
    .bind::<Text, _>(&hash)
    .execute(&mut conn)
    .await?;
    if inserted == 0 {
        return Err(OpsError::Invalid(format!(
            "account {name:?} exists already"
        )));
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Account {
    #[diesel(sql_type = Text)]
    role: String,
    #[diesel(sql_type = Text)]
    password_hash: String,
}

/// 16 random bytes from the thread's CSPRNG (seeded by the operating system).
fn new_salt() -> Result<SaltString, OpsError> {
    let bytes: [u8; 16] = rand::random();
    SaltString::encode_b64(&bytes).map_err(|e| OpsError::Invalid(format!("salt: {e}")))
}

/// A stand-in hash of a random password, checked when the name is unknown, so that case costs
/// the same as a wrong password.
fn decoy() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        new_salt()
            .ok()
            .and_then(|salt| {
                Argon2::default()
                    .hash_password(salt.as_str().as_bytes(), &salt)
                    .ok()
                    .map(|h| h.to_string())
            })
            .unwrap_or_default()
    })
}

/// Disables account `name`: its password and its open console sessions stop working.
pub async fn disable(common: &CommonArgs, name: &str) -> Result<(), OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    diesel::sql_query(
        "update operator set disabled_at = now() where name = $1 and disabled_at is null",
    )
    .bind::<Text, _>(name)
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// A fresh operator account with a random name and password, for one demo: (name, password).
pub async fn one_time(common: &CommonArgs) -> Result<(String, String), OpsError> {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let name = format!("demo-{}", hex(&rand::random::<[u8; 3]>()));
    let password = hex(&rand::random::<[u8; 12]>());
    add(common, &name, Role::Operator, &password).await?;
    Ok((name, password))
}

/// The role of account `name` if `password` is its password and the account is enabled;
/// `None` otherwise (whatever the reason).
pub async fn check(
    common: &CommonArgs,
    name: &str,
    password: &str,
) -> Result<Option<Role>, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let account: Option<Account> = diesel::sql_query(
        "select role, password_hash from operator where name = $1 and disabled_at is null",
    )
    .bind::<Text, _>(name)
    .get_result(&mut conn)
    .await
    .optional()?;
    let stored = account
        .as_ref()
        .map_or_else(|| decoy().to_string(), |a| a.password_hash.clone());
    let matches = PasswordHash::new(&stored).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    });
    match account {
        Some(a) if matches => Ok(Some(a.role.parse()?)),
        _ => Ok(None),
    }
}
