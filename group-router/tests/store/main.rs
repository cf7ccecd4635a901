//! Contract tests for the group store: every implementation passes the same
//! cases. SQLite always runs, each case on a file of its own and all of them
//! on one file; ScyllaDB runs all of them in a keyspace of its own when
//! `DAK_SCYLLA_NODES` names a cluster (comma-separated `host:port`), and is
//! skipped, saying so, when it does not.

use dak_wire::group::Role;
use dak_wire::{GroupId, UserId};
use group_router::scylla::ScyllaGroups;
use group_router::store::{Group, GroupChange, GroupStore, Member, SqliteGroups};

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn gid(s: &str) -> GroupId {
    GroupId::parse(s).unwrap()
}

fn admin(u: &str, joined_ts: u64) -> Member {
    Member {
        user: user(u),
        role: Role::Admin,
        joined_ts,
    }
}

fn plain(u: &str, joined_ts: u64) -> Member {
    Member {
        user: user(u),
        role: Role::Member,
        joined_ts,
    }
}

/// A group as the router hands it over: members sorted by user id.
fn group(id: &str, name: &str, by: &str, created_ts: u64, mut members: Vec<Member>) -> Group {
    members.sort_by(|a, b| a.user.cmp(&b.user));
    Group {
        id: gid(id),
        name: name.into(),
        created_by: user(by),
        created_ts,
        members,
    }
}

fn change(group: &Group, removed: &[&str]) -> GroupChange {
    GroupChange {
        group: group.clone(),
        removed: removed.iter().map(|u| user(u)).collect(),
    }
}

/// The same group without members: what saving deletes.
fn emptied(group: &Group, removed: &[&str]) -> GroupChange {
    let mut group = group.clone();
    group.members.clear();
    change(&group, removed)
}

async fn save(store: &dyn GroupStore, changes: &[GroupChange]) {
    store.save(changes).await.expect("save");
}

async fn load(store: &dyn GroupStore, ids: &[&str]) -> Vec<Option<Group>> {
    let ids: Vec<GroupId> = ids.iter().map(|id| gid(id)).collect();
    let loaded = store.load(&ids).await.expect("load");
    assert_eq!(loaded.len(), ids.len(), "one answer per id asked");
    loaded
}

async fn load_one(store: &dyn GroupStore, id: &str) -> Option<Group> {
    load(store, &[id]).await.pop().unwrap()
}

fn users(group: &Group) -> Vec<&str> {
    group.members.iter().map(|m| m.user.as_str()).collect()
}

async fn unknown_ids_load_as_none_in_the_order_asked(store: &dyn GroupStore, unique: &str) {
    let known = format!("known{unique}");
    assert_eq!(load(store, &[]).await, Vec::<Option<Group>>::new());
    assert_eq!(
        load(
            store,
            &[&format!("nobody{unique}"), &format!("nothing{unique}")]
        )
        .await,
        vec![None, None]
    );

    let g = group(&known, "known", "alice", 1, vec![admin("alice", 1)]);
    save(store, &[change(&g, &[])]).await;
    assert_eq!(
        load(
            store,
            &[
                &format!("before{unique}"),
                &known,
                &format!("after{unique}"),
                &known
            ]
        )
        .await,
        vec![None, Some(g.clone()), None, Some(g)],
        "each id answered in its place, an id asked twice answered twice"
    );
    store.check().await.expect("the store answers");
}

async fn a_saved_group_round_trips(store: &dyn GroupStore, unique: &str) {
    let id = format!("roundtrip{unique}");
    // Ids whose byte order differs from a case-blind or numeric one.
    let g = group(
        &id,
        "Café ☕ 'quoted' \"name\"; DROP TABLE groups",
        "Zed",
        1_700_000_000_123,
        vec![
            admin("Zed", 1_700_000_000_123),
            plain("alice", 1_700_000_000_500),
            admin("u10", 0),
            plain("u9", i64::MAX as u64),
        ],
    );
    save(store, &[change(&g, &[])]).await;
    let loaded = load_one(store, &id).await.expect("the group was saved");
    assert_eq!(loaded.id, g.id);
    assert_eq!(loaded.name, g.name);
    assert_eq!(loaded.created_by, user("Zed"));
    assert_eq!(loaded.created_ts, 1_700_000_000_123);
    assert_eq!(
        users(&loaded),
        vec!["Zed", "alice", "u10", "u9"],
        "members sorted by user id, byte-wise"
    );
    assert_eq!(loaded.members, g.members, "roles and join times kept");
    assert_eq!(loaded, g);
}

async fn members_added_later_come_back_in_user_order(store: &dyn GroupStore, unique: &str) {
    let id = format!("later{unique}");
    let first = group(
        &id,
        "later",
        "dave",
        10,
        vec![admin("dave", 10), plain("bob", 11)],
    );
    save(store, &[change(&first, &[])]).await;
    let second = group(
        &id,
        "later",
        "dave",
        10,
        vec![
            admin("dave", 10),
            plain("bob", 11),
            plain("erin", 20),
            plain("alice", 21),
            plain("carol", 22),
        ],
    );
    save(store, &[change(&second, &[])]).await;
    let loaded = load_one(store, &id).await.unwrap();
    assert_eq!(
        users(&loaded),
        vec!["alice", "bob", "carol", "dave", "erin"]
    );
    assert_eq!(loaded, second);
}

async fn saving_the_same_change_twice_is_idempotent(store: &dyn GroupStore, unique: &str) {
    let id = format!("twice{unique}");
    let g = group(
        &id,
        "twice",
        "alice",
        5,
        vec![admin("alice", 5), plain("bob", 6), plain("carol", 7)],
    );
    let c = change(&g, &[]);
    save(store, std::slice::from_ref(&c)).await;
    save(store, std::slice::from_ref(&c)).await;
    assert_eq!(load_one(store, &id).await, Some(g.clone()));
    save(store, &[c.clone(), c]).await;
    assert_eq!(
        load_one(store, &id).await,
        Some(g),
        "the same change twice in one call"
    );

    // Kafka hands a batch over again: its removal is saved again.
    let without_bob = group(
        &id,
        "twice",
        "alice",
        5,
        vec![admin("alice", 5), plain("carol", 7)],
    );
    let removal = change(&without_bob, &["bob"]);
    save(store, std::slice::from_ref(&removal)).await;
    save(store, std::slice::from_ref(&removal)).await;
    assert_eq!(load_one(store, &id).await, Some(without_bob));
}

async fn removed_members_go_and_the_rest_stay(store: &dyn GroupStore, unique: &str) {
    let id = format!("removal{unique}");
    let other = format!("removal-other{unique}");
    let g = group(
        &id,
        "removal",
        "alice",
        100,
        vec![
            admin("alice", 100),
            plain("bob", 101),
            admin("carol", 102),
            plain("dave", 103),
        ],
    );
    // bob and dave also belong to another group, which keeps them.
    let o = group(
        &other,
        "other",
        "bob",
        50,
        vec![admin("bob", 50), plain("dave", 51)],
    );
    save(store, &[change(&g, &[]), change(&o, &[])]).await;

    let after = group(
        &id,
        "removal",
        "alice",
        100,
        vec![admin("alice", 100), admin("carol", 102)],
    );
    save(store, &[change(&after, &["bob", "dave"])]).await;
    let loaded = load_one(store, &id).await.unwrap();
    assert_eq!(users(&loaded), vec!["alice", "carol"], "bob and dave went");
    assert_eq!(loaded, after, "the others kept their roles and join times");
    assert_eq!(
        load_one(store, &other).await,
        Some(o),
        "a removal touches only its own group"
    );
}

async fn a_rename_is_kept(store: &dyn GroupStore, unique: &str) {
    let id = format!("rename{unique}");
    let g = group(
        &id,
        "before",
        "alice",
        7,
        vec![admin("alice", 7), plain("bob", 8)],
    );
    save(store, &[change(&g, &[])]).await;
    let renamed = Group {
        name: "after".into(),
        ..g.clone()
    };
    save(store, &[change(&renamed, &[])]).await;
    let loaded = load_one(store, &id).await.unwrap();
    assert_eq!(loaded.name, "after");
    assert_eq!(loaded, renamed, "only the name changed");
}

async fn the_whole_state_is_written(store: &dyn GroupStore, unique: &str) {
    let id = format!("state{unique}");
    let g = group(
        &id,
        "state",
        "alice",
        1,
        vec![admin("alice", 1), plain("bob", 2), plain("carol", 3)],
    );
    save(store, &[change(&g, &[])]).await;
    // bob left and was added back within one batch: still a member, with the
    // new join time; and the creator and creation time are written as given.
    let rewritten = group(
        &id,
        "state",
        "carol",
        3,
        vec![admin("alice", 1), plain("bob", 40), plain("carol", 3)],
    );
    save(store, &[change(&rewritten, &[])]).await;
    let loaded = load_one(store, &id).await.unwrap();
    assert_eq!(loaded.created_by, user("carol"));
    assert_eq!(loaded.created_ts, 3);
    assert_eq!(loaded.members[1], plain("bob", 40), "bob's new join time");
    assert_eq!(loaded, rewritten);
}

async fn a_promotion_is_kept(store: &dyn GroupStore, unique: &str) {
    let id = format!("promote{unique}");
    let g = group(
        &id,
        "promote",
        "alice",
        1,
        vec![admin("alice", 1), plain("bob", 2), plain("carol", 3)],
    );
    save(store, &[change(&g, &[])]).await;
    // alice left; bob, the longest-standing, is promoted.
    let promoted = group(
        &id,
        "promote",
        "alice",
        1,
        vec![admin("bob", 2), plain("carol", 3)],
    );
    save(store, &[change(&promoted, &["alice"])]).await;
    let loaded = load_one(store, &id).await.unwrap();
    assert_eq!(loaded.members[0], admin("bob", 2), "bob is now admin");
    assert_eq!(
        loaded.members[1],
        plain("carol", 3),
        "carol is still a member"
    );
    assert_eq!(loaded, promoted);

    // And back: a role change alone, nobody leaving.
    let demoted = group(
        &id,
        "promote",
        "alice",
        1,
        vec![plain("bob", 2), admin("carol", 3)],
    );
    save(store, &[change(&demoted, &[])]).await;
    assert_eq!(load_one(store, &id).await, Some(demoted));
}

async fn an_empty_group_is_deleted_and_its_id_starts_afresh(store: &dyn GroupStore, unique: &str) {
    let id = format!("empty{unique}");
    let sibling = format!("empty-sibling{unique}");
    let g = group(
        &id,
        "old",
        "alice",
        1_000,
        vec![
            admin("alice", 1_000),
            plain("bob", 1_001),
            plain("carol", 1_002),
        ],
    );
    let s = group(
        &sibling,
        "sibling",
        "alice",
        900,
        vec![admin("alice", 900), plain("bob", 901)],
    );
    save(store, &[change(&g, &[]), change(&s, &[])]).await;

    // `removed` names only the last to leave: deleting the group still drops
    // every member row.
    save(store, &[emptied(&g, &["carol"])]).await;
    assert_eq!(load_one(store, &id).await, None, "the group is gone");
    assert_eq!(
        load_one(store, &sibling).await,
        Some(s),
        "another group with the same members stays"
    );
    // Deleting again (a redelivery) is harmless.
    save(store, &[emptied(&g, &["carol"])]).await;
    assert_eq!(load_one(store, &id).await, None);

    // The id is created anew, by someone else: nothing of the old group shows.
    let fresh = group(&id, "new", "zoe", 2_000, vec![admin("zoe", 2_000)]);
    save(store, &[change(&fresh, &[])]).await;
    let loaded = load_one(store, &id).await.expect("the new group");
    assert_eq!(users(&loaded), vec!["zoe"], "no old member came back");
    assert_eq!(loaded, fresh);
}

async fn several_groups_in_one_save(store: &dyn GroupStore, unique: &str) {
    let [g0, g1, g2, g3] = ["0", "1", "2", "3"].map(|n| format!("several{n}{unique}"));
    let old = group(&g0, "zero", "alice", 1, vec![admin("alice", 1)]);
    save(store, &[change(&old, &[])]).await;

    let one = group(
        &g1,
        "one",
        "alice",
        2,
        vec![admin("alice", 2), plain("bob", 3)],
    );
    let two = group(&g2, "two", "bob", 4, vec![admin("bob", 4)]);
    let three = group(
        &g3,
        "three",
        "carol",
        5,
        vec![admin("carol", 5), plain("alice", 6), plain("dave", 7)],
    );
    save(
        store,
        &[
            change(&one, &[]),
            emptied(&old, &["alice"]),
            change(&two, &[]),
            change(&three, &[]),
        ],
    )
    .await;
    assert_eq!(
        load(store, &[&g3, &g0, &g1, &g2]).await,
        vec![Some(three), None, Some(one), Some(two)]
    );
}

async fn many_groups_load_at_once(store: &dyn GroupStore, unique: &str) {
    let groups: Vec<Group> = (0..300)
        .map(|i| {
            group(
                &format!("many{i}{unique}"),
                &format!("group {i}"),
                &format!("owner{i}"),
                i,
                vec![
                    admin(&format!("owner{i}"), i),
                    plain(&format!("guest{}", i % 7), i + 1),
                ],
            )
        })
        .collect();
    let changes: Vec<GroupChange> = groups.iter().map(|g| change(g, &[])).collect();
    save(store, &changes).await;

    // Backwards, with an unknown id after every tenth.
    let mut ids = Vec::new();
    let mut expected = Vec::new();
    for (i, g) in groups.iter().enumerate().rev() {
        ids.push(g.id.to_string());
        expected.push(Some(g.clone()));
        if i % 10 == 0 {
            ids.push(format!("missing{i}{unique}"));
            expected.push(None);
        }
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(load(store, &ids).await, expected);
}

async fn a_group_of_1024_members_round_trips(store: &dyn GroupStore, unique: &str) {
    let id = format!("big{unique}");
    // Ids of the longest length allowed: the write of the whole group is
    // ~150 KB, past Cassandra's batch size limit for a batch over several
    // partitions (50 KiB by default).
    let members: Vec<Member> = (0..1024u64)
        .map(|i| {
            let name = format!("user{i:0>124}");
            if i % 100 == 0 {
                admin(&name, 10_000 + i)
            } else {
                plain(&name, 10_000 + i)
            }
        })
        .collect();
    let first = members[0].user.as_str().to_owned();
    let big = group(&id, "big", &first, 10_000, members);
    assert_eq!(big.members.len(), 1024);
    save(store, &[change(&big, &[])]).await;
    let loaded = load_one(store, &id).await.expect("the big group");
    assert_eq!(loaded.members.len(), 1024);
    assert_eq!(loaded, big);

    // Every other one leaves, all at once.
    let mut stay = Vec::new();
    let mut gone = Vec::new();
    for (i, m) in big.members.iter().enumerate() {
        if i % 2 == 1 {
            gone.push(m.user.as_str());
        } else {
            stay.push(m.clone());
        }
    }
    let half = Group {
        members: stay,
        ..big.clone()
    };
    save(store, &[change(&half, &gone)]).await;
    let loaded = load_one(store, &id).await.unwrap();
    assert_eq!(loaded.members.len(), 512);
    assert_eq!(loaded, half);
}

/// Generates `contract`, which runs every case on one store, and a SQLite
/// test per case, each on a file of its own.
macro_rules! contract {
    ($($case:ident),+ $(,)?) => {
        /// The suite every group store passes. `unique` makes ids no other run
        /// uses.
        pub async fn contract(store: &dyn GroupStore, unique: &str) {
            $( $case(store, unique).await; )+
        }

        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::SqliteGroups::open(&dir.path().join("groups.db")).unwrap();
                    super::$case(&store, "").await;
                }
            )+
        }
    };
}

contract!(
    unknown_ids_load_as_none_in_the_order_asked,
    a_saved_group_round_trips,
    members_added_later_come_back_in_user_order,
    saving_the_same_change_twice_is_idempotent,
    removed_members_go_and_the_rest_stay,
    a_rename_is_kept,
    the_whole_state_is_written,
    a_promotion_is_kept,
    an_empty_group_is_deleted_and_its_id_starts_afresh,
    several_groups_in_one_save,
    many_groups_load_at_once,
    a_group_of_1024_members_round_trips,
);

#[tokio::test]
async fn sqlite_groups_keep_the_contract_on_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteGroups::open(&dir.path().join("groups.db")).unwrap();
    contract(&store, "").await;
}

#[tokio::test]
async fn sqlite_groups_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("groups.db");
    let kept = group(
        "kept",
        "kept",
        "alice",
        1,
        vec![admin("alice", 1), plain("bob", 2)],
    );
    let gone = group("gone", "gone", "carol", 3, vec![admin("carol", 3)]);
    {
        let store = SqliteGroups::open(&path).unwrap();
        save(&store, &[change(&kept, &[]), change(&gone, &[])]).await;
        save(&store, &[emptied(&gone, &["carol"])]).await;
    }
    let store = SqliteGroups::open(&path).unwrap();
    assert_eq!(
        load(&store, &["kept", "gone"]).await,
        vec![Some(kept.clone()), None]
    );

    // And it goes on from there.
    let grown = group(
        "kept",
        "kept",
        "alice",
        1,
        vec![admin("alice", 1), plain("bob", 2), plain("carol", 4)],
    );
    save(&store, &[change(&grown, &[])]).await;
    drop(store);
    let store = SqliteGroups::open(&path).unwrap();
    assert_eq!(load_one(&store, "kept").await, Some(grown));
}

#[tokio::test]
async fn sqlite_deleting_a_group_leaves_no_row_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("groups.db");
    let store = SqliteGroups::open(&path).unwrap();
    let g = group(
        "leaving",
        "leaving",
        "alice",
        1,
        vec![admin("alice", 1), plain("bob", 2)],
    );
    save(&store, &[change(&g, &[])]).await;
    save(&store, &[emptied(&g, &["bob"])]).await;
    let db = rusqlite::Connection::open(&path).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT COUNT(*) FROM groups WHERE id = 'leaving'"),
        0,
        "the group row went"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM group_members WHERE group_id = 'leaving'"),
        0,
        "every member row went, not only those in `removed`"
    );
}

#[tokio::test]
async fn scylla_groups_keep_the_contract() {
    dak_runtime::scylla::with_test_keyspace(
        "scylla_groups_keep_the_contract",
        |nodes, keyspace| async move {
            let store = ScyllaGroups::connect(&nodes, &keyspace, &Default::default())
                .await
                .expect("connect to DAK_TEST_SCYLLA_NODES and create the keyspace");
            contract(&store, &ulid::Ulid::new().to_string().to_lowercase()).await;
        },
    )
    .await;
}
