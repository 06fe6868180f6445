//! Personal data as the console shows it outside the member page: enough to recognise, not
//! enough to use.

/// `kim.minsu@example.com` becomes `k********@example.com`; text without `@` is masked whole.
pub fn email(s: &str) -> String {
    match s.split_once('@') {
        Some((local, domain)) => {
            let mut chars = local.chars();
            let first = chars.next().map(String::from).unwrap_or_default();
            format!("{first}{}@{domain}", "*".repeat(chars.count()))
        }
        None => "*".repeat(s.chars().count()),
    }
}

/// Every digit but the last four becomes `*`: `010-1234-5678` becomes `***-****-5678`.
pub fn phone(s: &str) -> String {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    let mut seen = 0;
    s.chars()
        .map(|c| {
            if c.is_ascii_digit() {
                seen += 1;
                if seen + 4 <= digits { '*' } else { c }
            } else {
                c
            }
        })
        .collect()
}

/// Masks the values of `email`, `phone` and `address` fields anywhere in `v` (a decoded
/// record shown on the dead-letter page).
pub fn json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                match (k.as_str(), &val) {
                    ("email", serde_json::Value::String(s)) => *val = email(s).into(),
                    ("phone", serde_json::Value::String(s)) => *val = phone(s).into(),
                    ("address", serde_json::Value::String(s)) => {
                        *val = if s.contains('@') { email(s) } else { phone(s) }.into();
                    }
                    _ => json(val),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_keep_their_first_letter_and_domain() {
        assert_eq!(email("kim.minsu@example.com"), "k********@example.com");
        assert_eq!(email("a@b.kr"), "a@b.kr");
        assert_eq!(email("no-at-sign"), "**********");
    }

    #[test]
    fn phones_keep_their_last_four_digits() {
        assert_eq!(phone("010-1234-5678"), "***-****-5678");
        assert_eq!(phone("+82 10 1234 5678"), "+** ** **** 5678");
    }

    #[test]
    fn nested_fields_are_masked() {
        let mut v = serde_json::json!({"member": {"email": "lee@example.com", "phone": "010-1111-2222"},
                                       "address": "010-9999-8888", "name": "Lee"});
        json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"member": {"email": "l**@example.com", "phone": "***-****-2222"},
                               "address": "***-****-8888", "name": "Lee"})
        );
    }
}
