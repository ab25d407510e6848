//! CQL migrations, numbered and applied in order by `confab migrate`. Each file holds statements
//! separated by `;` and must be safe to apply twice (`IF NOT EXISTS`), because a migration that failed
//! half-way is re-run whole. Only CQL that both ScyllaDB and Apache Cassandra 5 accept: no
//! materialized views, no secondary indexes, no `ALLOW FILTERING`.

/// One schema migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub cql: &'static str,
}

pub const CQL_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        cql: include_str!("migrations/0001_initial.cql"),
    },
    Migration {
        version: 2,
        name: "activity_reactions_markers_search",
        cql: include_str!("migrations/0002_activity_reactions_markers_search.cql"),
    },
    Migration {
        version: 3,
        name: "tallies_summaries",
        cql: include_str!("migrations/0003_tallies_summaries.cql"),
    },
    Migration {
        version: 4,
        name: "devices",
        cql: include_str!("migrations/0004_devices.cql"),
    },
    Migration {
        version: 5,
        name: "settings",
        cql: include_str!("migrations/0005_settings.cql"),
    },
    Migration {
        version: 6,
        name: "attachments",
        cql: include_str!("migrations/0006_attachments.cql"),
    },
    Migration {
        version: 7,
        name: "outbox",
        cql: include_str!("migrations/0007_outbox.cql"),
    },
    Migration {
        version: 8,
        name: "circles_queues",
        cql: include_str!("migrations/0008_circles_queues.cql"),
    },
    Migration {
        version: 9,
        name: "calls",
        cql: include_str!("migrations/0009_calls.cql"),
    },
    Migration {
        version: 10,
        name: "circle_seats",
        cql: include_str!("migrations/0010_circle_seats.cql"),
    },
    Migration {
        version: 11,
        name: "list_reads",
        cql: include_str!("migrations/0011_list_reads.cql"),
    },
    Migration {
        version: 12,
        name: "entries_in_user_rows",
        cql: include_str!("migrations/0012_entries_in_user_rows.cql"),
    },
    Migration {
        version: 13,
        name: "small_objects",
        cql: include_str!("migrations/0013_small_objects.cql"),
    },
    Migration {
        version: 14,
        name: "blob_marks",
        cql: include_str!("migrations/0014_blob_marks.cql"),
    },
    Migration {
        version: 15,
        name: "live_calls",
        cql: include_str!("migrations/0015_live_calls.cql"),
    },
    Migration {
        version: 16,
        name: "attachment_claims",
        cql: include_str!("migrations/0016_attachment_claims.cql"),
    },
    Migration {
        version: 17,
        name: "call_signals",
        cql: include_str!("migrations/0017_call_signals.cql"),
    },
    Migration {
        version: 18,
        name: "call_joins",
        cql: include_str!("migrations/0018_call_joins.cql"),
    },
    Migration {
        version: 19,
        name: "chat_calls",
        cql: include_str!("migrations/0019_chat_calls.cql"),
    },
    Migration {
        version: 20,
        name: "circle_member_seats",
        cql: include_str!("migrations/0020_circle_member_seats.cql"),
    },
    Migration {
        version: 21,
        name: "left_chats",
        cql: include_str!("migrations/0021_left_chats.cql"),
    },
    Migration {
        version: 22,
        name: "user_sessions",
        cql: include_str!("migrations/0022_user_sessions.cql"),
    },
    Migration {
        version: 23,
        name: "user_addresses",
        cql: include_str!("migrations/0023_user_addresses.cql"),
    },
    Migration {
        version: 24,
        name: "circle_removals",
        cql: include_str!("migrations/0024_circle_removals.cql"),
    },
];

/// The table and column of `statement` when it is `ALTER TABLE <table> ADD <column> <type>`
/// (optionally `static`): a statement the runner makes idempotent itself, by adding the column
/// only when it is missing.
pub fn added_column(statement: &str) -> Option<(&str, &str)> {
    let words: Vec<&str> = statement.split_whitespace().collect();
    let (alter, table_kw, table, add, column) = match words.as_slice() {
        [alter, table_kw, table, add, column, _type] => (alter, table_kw, table, add, column),
        [alter, table_kw, table, add, column, _type, kind]
            if kind.eq_ignore_ascii_case("STATIC") =>
        {
            (alter, table_kw, table, add, column)
        }
        _ => return None,
    };
    (alter.eq_ignore_ascii_case("ALTER")
        && table_kw.eq_ignore_ascii_case("TABLE")
        && add.eq_ignore_ascii_case("ADD"))
    .then_some((table, column))
}

impl Migration {
    /// The statements of this migration, comments and blank lines removed.
    pub fn statements(&self) -> Vec<String> {
        let without_comments: String = self
            .cql
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        without_comments
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// Width of a history bucket: one UTC day. See docs/ARCHITECTURE.md for the arithmetic.
pub const SIGNAL_BUCKET_MILLIS: i64 = 86_400_000;

/// The history bucket a signal created at `unix_millis` falls in.
pub fn signal_bucket(unix_millis: i64) -> i32 {
    i32::try_from(unix_millis.div_euclid(SIGNAL_BUCKET_MILLIS)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_idempotent() {
        for (index, migration) in CQL_MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version as usize, index + 1);
            for statement in migration.statements() {
                let upper = statement.to_uppercase();
                assert!(
                    upper.contains("IF NOT EXISTS") || added_column(&statement).is_some(),
                    "not idempotent: {statement}"
                );
                for banned in [
                    "MATERIALIZED VIEW",
                    "CREATE INDEX",
                    "ALLOW FILTERING",
                    "USING TIMEOUT",
                ] {
                    assert!(
                        !upper.contains(banned),
                        "{banned} is not portable: {statement}"
                    );
                }
            }
        }
    }

    #[test]
    fn buckets_are_days() {
        assert_eq!(signal_bucket(0), 0);
        assert_eq!(signal_bucket(SIGNAL_BUCKET_MILLIS - 1), 0);
        assert_eq!(signal_bucket(SIGNAL_BUCKET_MILLIS), 1);
    }
}
