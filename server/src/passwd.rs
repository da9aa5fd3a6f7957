//! `ferry passwd`: reads a password without putting it on the command line and prints its
//! argon2id hash for a `[[users]]` table.

use std::io::{self, BufRead, IsTerminal};

/// Why no hash was made.
#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("the passwords do not match")]
    Mismatch,
    #[error("the password is empty")]
    Empty,
    #[error("reading the password: {0}")]
    Io(#[from] io::Error),
}

/// The password: asked twice at the terminal without echo when standard input is one, otherwise
/// the first line of standard input (its line ending removed).
pub fn read_password() -> Result<Vec<u8>, PasswdError> {
    let password = if io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Password again: ")?;
        if first != again {
            return Err(PasswdError::Mismatch);
        }
        first.into_bytes()
    } else {
        read_line(&mut io::stdin().lock())?
    };
    if password.is_empty() {
        return Err(PasswdError::Empty);
    }
    Ok(password)
}

/// The first line of `input`, without its `\n` or `\r\n`. Any other byte is part of the password.
pub fn read_line(input: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    input.read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    Ok(line)
}

/// The `[[users]]` table to paste into the config, for stderr.
pub fn users_table(name: Option<&str>, hash: &str) -> String {
    let name = match name {
        // A TOML basic string: the Debug form escapes quotes and backslashes the same way for
        // the names anyone uses.
        Some(n) => format!("{n:?}"),
        None => "\"NAME\"".to_string(),
    };
    format!("# for the configuration file:\n[[users]]\nname = {name}\npassword_hash = \"{hash}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_is_read_without_its_line_ending() {
        for (input, expected) in [
            (&b"s3cret\n"[..], &b"s3cret"[..]),
            (b"s3cret\r\n", b"s3cret"),
            (b"s3cret", b"s3cret"),
            (b" spaced out \nsecond line\n", b" spaced out "),
            (b"\n", b""),
            (b"", b""),
        ] {
            assert_eq!(read_line(&mut &input[..]).unwrap(), expected, "{input:?}");
        }
    }

    #[test]
    fn the_users_table_is_valid_toml() {
        let table = users_table(Some("al\"ice"), "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA");
        let parsed: toml::Value = toml::from_str(&table).unwrap();
        let user = &parsed["users"][0];
        assert_eq!(user["name"].as_str(), Some("al\"ice"));
        assert_eq!(user["password_hash"].as_str(), Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"));
        assert!(users_table(None, "h").contains("name = \"NAME\""));
    }
}
