//! [pure] OpenCode's version (`GET /global/health` `version`) and what the
//! bridge makes of it. docs/COMPATIBILITY.md tells the same story for users.
//!
//! | version | verdict |
//! |---|---|
//! | below 1.2 | refused: no `message.part.delta` events, older permission events |
//! | 1.2 - 1.14.33 | untested: a warning, then served |
//! | 1.14.34 - 1.14.41, 1.15.5 - 1.18.x | supported (tested by `.ci/compat`) |
//! | 1.14.42 - 1.15.4 | refused: `/event` lacks `message.updated` / `message.part.updated`; upgrade to 1.15.5 or newer |
//! | 1.19 and later 1.x | untested: a warning, then served (the v1 routes are probed) |
//! | 2.x and later | refused: the v1 routes the bridge uses are gone |
//! | unreadable (a dev build) | unknown: a warning, then served (the v1 routes are probed) |

use std::fmt;

/// `major.minor.patch`; a pre-release or build suffix is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub const fn new(major: u64, minor: u64, patch: u64) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    /// `1.18.34`, `v1.18.34`, `1.18.35-beta.1`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim();
        let s = s.strip_prefix('v').unwrap_or(s);
        let core = s.split(['-', '+']).next()?;
        let mut it = core.split('.');
        let mut num = || -> Option<u64> {
            let n = it.next()?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            n.parse().ok()
        };
        let v = Version::new(num()?, num()?, num()?);
        it.next().is_none().then_some(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The oldest version `.ci/compat` runs the end-to-end tests against.
pub const OLDEST_TESTED: Version = Version::new(1, 14, 34);
/// The newest minor version tested (every 1.18 patch is taken).
pub const NEWEST_TESTED_MINOR: (u64, u64) = (1, 18);
/// The broken range, both ends included, and the first good release after it.
pub const BROKEN_FROM: Version = Version::new(1, 14, 42);
pub const BROKEN_TO: Version = Version::new(1, 15, 4);
pub const FIXED_IN: Version = Version::new(1, 15, 5);
/// `message.part.delta` appeared in 1.2.
pub const OLDEST_WORKING: Version = Version::new(1, 2, 0);

/// What the bridge does with a server of some version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Tested: served.
    Supported,
    /// Not tested but expected to work: a warning, then served.
    Untested(String),
    /// Known not to work: the daemon refuses to start (exit 78).
    Refused(String),
}

impl Verdict {
    pub fn is_refused(&self) -> bool {
        matches!(self, Verdict::Refused(_))
    }
}

/// Judges the version string a server reports.
pub fn classify(reported: &str) -> Verdict {
    let range = supported_range();
    let Some(v) = Version::parse(reported) else {
        return Verdict::Untested(format!(
            "OpenCode reports version {reported:?}, which is not a release number; the bridge is tested with {range}"
        ));
    };
    if v.major >= 2 {
        return Verdict::Refused(format!(
            "OpenCode {v} is not supported: 2.x removed the v1 HTTP routes the bridge uses; run OpenCode {range}"
        ));
    }
    if v.major == 0 && v.minor == 0 && v.patch == 0 {
        // A build from source says 0.0.0-<something>.
        return Verdict::Untested(format!(
            "OpenCode reports version {reported:?} (a development build?); the bridge is tested with {range}"
        ));
    }
    if v < OLDEST_WORKING {
        return Verdict::Refused(format!(
            "OpenCode {v} is too old: before 1.2 its event stream has no message.part.delta, which the bridge reads; upgrade to {FIXED_IN} or newer (supported: {range})"
        ));
    }
    if (BROKEN_FROM..=BROKEN_TO).contains(&v) {
        return Verdict::Refused(format!(
            "OpenCode {v} is known not to work: {BROKEN_FROM} to {BROKEN_TO} do not send message.updated / message.part.updated on /event, so turns never end; upgrade to {FIXED_IN} or newer (supported: {range})"
        ));
    }
    if v < OLDEST_TESTED {
        return Verdict::Untested(format!(
            "OpenCode {v} is older than the oldest tested version ({OLDEST_TESTED}); an upgrade is advised (supported: {range})"
        ));
    }
    if (v.major, v.minor) > NEWEST_TESTED_MINOR {
        return Verdict::Untested(format!(
            "OpenCode {v} is newer than the versions tested ({range}); .ci/compat runs the tests against it"
        ));
    }
    Verdict::Supported
}

/// `1.14.34 to 1.18.x, except 1.14.42 to 1.15.4`, for messages.
pub fn supported_range() -> String {
    format!(
        "{OLDEST_TESTED} to {}.{}.x, except {BROKEN_FROM} to {BROKEN_TO}",
        NEWEST_TESTED_MINOR.0, NEWEST_TESTED_MINOR.1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_numbers_only() {
        assert_eq!(Version::parse("1.18.34"), Some(Version::new(1, 18, 34)));
        assert_eq!(Version::parse(" v2.0.1 "), Some(Version::new(2, 0, 1)));
        assert_eq!(
            Version::parse("1.18.35-beta.1"),
            Some(Version::new(1, 18, 35))
        );
        assert_eq!(Version::parse("1.18.35+abc"), Some(Version::new(1, 18, 35)));
        for bad in ["", "1.18", "1.18.34.1", "1..3", "x.y.z", "1.18.-3", "local"] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
        assert!(Version::new(1, 15, 13) > Version::new(1, 15, 5));
    }

    #[test]
    fn every_range_gets_its_verdict() {
        for v in [
            "1.14.34", "1.14.41", "1.15.5", "1.15.13", "1.17.19", "1.18.3", "1.18.34", "1.18.99",
        ] {
            assert_eq!(classify(v), Verdict::Supported, "{v}");
        }
        for v in ["1.14.42", "1.14.48", "1.15.0", "1.15.3", "1.15.4"] {
            match classify(v) {
                Verdict::Refused(why) => {
                    assert!(why.contains("upgrade to 1.15.5 or newer"), "{v}: {why}");
                    assert!(why.contains(v), "{v}: {why}");
                }
                other => panic!("{v}: {other:?}"),
            }
        }
        for v in ["2.0.0", "2.1.3", "3.0.0-rc.1"] {
            match classify(v) {
                Verdict::Refused(why) => assert!(why.contains("2.x removed the v1"), "{why}"),
                other => panic!("{v}: {other:?}"),
            }
        }
        for v in ["1.0.0", "1.1.9", "0.9.0"] {
            assert!(classify(v).is_refused(), "{v}");
        }
        for v in [
            "1.2.0",
            "1.14.33",
            "1.19.0",
            "1.30.2",
            "0.0.0-dev-202611",
            "local",
            "",
        ] {
            assert!(matches!(classify(v), Verdict::Untested(_)), "{v}");
        }
    }
}
