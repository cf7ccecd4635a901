//! What one `dak.group` event does to its group, and who hears about it. Pure:
//! no I/O, so the rules are tested here and the service only loads, applies,
//! publishes and saves.

use dak_wire::event::{Delivery, Message, Notice};
use dak_wire::group::{GroupCommand, GroupOp, Role, SystemEvent, SystemKind};
use dak_wire::{ChatKind, GroupId, UserId, WireError};

use crate::store::{Group, Member};
use crate::Config;

/// The deliveries an event produced, and whether it changed the group.
#[derive(Debug, Default)]
pub struct Applied {
    pub deliveries: Vec<Delivery>,
    pub changed: bool,
    /// `applied`, `unchanged` or `rejected`, for the metrics.
    pub result: &'static str,
}

/// The group as it stands, if it exists. A group whose last member left is
/// kept in memory with no members until saved, and counts as not existing.
fn existing(group: &Option<Group>) -> Option<&Group> {
    group.as_ref().filter(|g| !g.members.is_empty())
}

fn not_a_member(group: &GroupId) -> WireError {
    // The same answer for both cases, so the reply does not tell whether a group exists.
    WireError::forbidden(format!(
        "group `{group}` does not exist or you are not a member"
    ))
}

impl Group {
    pub fn member(&self, user: &UserId) -> Option<&Member> {
        self.members
            .binary_search_by(|m| m.user.cmp(user))
            .ok()
            .map(|i| &self.members[i])
    }

    fn insert(&mut self, member: Member) {
        if let Err(i) = self.members.binary_search_by(|m| m.user.cmp(&member.user)) {
            self.members.insert(i, member);
        }
    }

    fn remove(&mut self, user: &UserId) {
        if let Ok(i) = self.members.binary_search_by(|m| m.user.cmp(user)) {
            self.members.remove(i);
        }
    }

    /// One delivery of `message` to every member.
    fn to_members(&self, message: &Message) -> Vec<Delivery> {
        self.members
            .iter()
            .map(|m| Delivery {
                recipient: m.user.clone(),
                device: None,
                message: message.clone(),
            })
            .collect()
    }
}

/// A message to the group: one delivery per member, or a rejection for a
/// sender who is not a member. Typing skips the typist's own devices.
pub fn message(group: &Option<Group>, id: &GroupId, message: Message) -> Applied {
    let Some(g) = existing(group).filter(|g| g.member(&message.from).is_some()) else {
        if message.ephemeral {
            return Applied {
                result: "rejected",
                ..Applied::default()
            };
        }
        return rejected(&message, not_a_member(id));
    };
    let mut deliveries = g.to_members(&message);
    if matches!(message.notice, Some(Notice::Typing)) {
        deliveries.retain(|d| d.recipient != message.from);
    }
    Applied {
        deliveries,
        changed: false,
        result: "applied",
    }
}

/// Tells the device that sent `message` (or the command that `message`
/// notifies) why it was refused.
fn rejected(message: &Message, error: WireError) -> Applied {
    tracing::debug!(mid = %message.mid, from = %message.from, error = %error.message, "group event rejected");
    Applied {
        deliveries: vec![Message::rejection(
            message.mid,
            &message.id,
            &message.from,
            &message.from_device,
            &error,
            message.ts,
        )],
        changed: false,
        result: "rejected",
    }
}

/// Applies a command to `group`, in place.
pub fn command(group: &mut Option<Group>, command: GroupCommand, config: &Config) -> Applied {
    let max_members = config.max_members;
    // A change of many users names only the first `notice_users` of them, so
    // that one change never costs the square of the group's size.
    let notice = |event: SystemKind, mut users: Vec<UserId>, name: Option<String>| Message {
        mid: command.mid,
        id: command.id.clone(),
        from: command.from.clone(),
        from_device: command.from_device.clone(),
        to: command.group.to_string(),
        chat: ChatKind::Group,
        body: None,
        ephemeral: false,
        notice: Some(Notice::Group(SystemEvent {
            event,
            count: (users.len() > config.notice_users).then(|| {
                let count = users.len();
                users.truncate(config.notice_users);
                count
            }),
            users,
            by: command.from.clone(),
            name,
        })),
        ts: command.ts,
    };
    let reject = |error: WireError| rejected(&notice(SystemKind::Created, vec![], None), error);
    let unchanged = || Applied {
        result: "unchanged",
        ..Applied::default()
    };
    let applied = |deliveries| Applied {
        deliveries,
        changed: true,
        result: "applied",
    };
    let from = &command.from;

    if let GroupOp::Create { name, members } = &command.op {
        return match existing(group) {
            // Created before by the same author: a retry, nothing to do.
            Some(g) if &g.created_by == from => unchanged(),
            Some(_) => reject(WireError::forbidden(format!(
                "group id `{}` is taken; choose another",
                command.group
            ))),
            None => {
                let others: Vec<UserId> = members.iter().filter(|u| *u != from).cloned().collect();
                if others.len() + 1 > max_members {
                    return reject(WireError::too_large(format!(
                        "a group holds at most {max_members} members"
                    )));
                }
                let mut g = Group {
                    id: command.group.clone(),
                    name: name.clone(),
                    created_by: from.clone(),
                    created_ts: command.ts,
                    members: Vec::with_capacity(others.len() + 1),
                };
                g.insert(member(from, Role::Admin, command.ts));
                for user in &others {
                    g.insert(member(user, Role::Member, command.ts));
                }
                let deliveries =
                    g.to_members(&notice(SystemKind::Created, others, Some(name.clone())));
                *group = Some(g);
                applied(deliveries)
            }
        };
    }

    let Some(g) = group.as_mut().filter(|g| !g.members.is_empty()) else {
        return reject(not_a_member(&command.group));
    };
    let Some(role) = g.member(from).map(|m| m.role) else {
        return reject(not_a_member(&command.group));
    };
    match &command.op {
        GroupOp::Create { .. } => unreachable!("handled above"),
        GroupOp::Add { members } => {
            if role != Role::Admin {
                return reject(WireError::forbidden(format!(
                    "only admins can add members to group `{}`",
                    command.group
                )));
            }
            let new: Vec<UserId> = members
                .iter()
                .filter(|u| g.member(u).is_none())
                .cloned()
                .collect();
            if new.is_empty() {
                return unchanged();
            }
            if g.members.len() + new.len() > max_members {
                return reject(WireError::too_large(format!(
                    "group `{}` would have {} members; a group holds at most {max_members}",
                    command.group,
                    g.members.len() + new.len()
                )));
            }
            for user in &new {
                g.insert(member(user, Role::Member, command.ts));
            }
            applied(g.to_members(&notice(SystemKind::Added, new, None)))
        }
        GroupOp::Remove { user } if user == from => {
            // Leaving: the leaver hears it too, then is gone.
            let mut deliveries = g.to_members(&notice(SystemKind::Left, vec![from.clone()], None));
            g.remove(from);
            if !g.members.is_empty() && !g.members.iter().any(|m| m.role == Role::Admin) {
                let heir = g
                    .members
                    .iter_mut()
                    .min_by(|a, b| (a.joined_ts, &a.user).cmp(&(b.joined_ts, &b.user)))
                    .expect("members is not empty");
                heir.role = Role::Admin;
                let heir = heir.user.clone();
                let mut promoted = notice(SystemKind::Promoted, vec![heir], None);
                // A second notice from one command: the next mid after the command's.
                promoted.mid = command.mid.next();
                deliveries.extend(g.to_members(&promoted));
            }
            applied(deliveries)
        }
        GroupOp::Remove { user } => {
            if role != Role::Admin {
                return reject(WireError::forbidden(format!(
                    "only admins can remove members from group `{}`",
                    command.group
                )));
            }
            if g.member(user).is_none() {
                return unchanged();
            }
            // The removed member hears it too, then is gone.
            let deliveries = g.to_members(&notice(SystemKind::Removed, vec![user.clone()], None));
            g.remove(user);
            applied(deliveries)
        }
        GroupOp::Rename { name } => {
            if &g.name == name {
                return unchanged();
            }
            g.name = name.clone();
            applied(g.to_members(&notice(SystemKind::Renamed, vec![], Some(name.clone()))))
        }
    }
}

fn member(user: &UserId, role: Role, joined_ts: u64) -> Member {
    Member {
        user: user.clone(),
        role,
        joined_ts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_members: usize) -> Config {
        Config {
            max_members,
            notice_users: 64,
        }
    }
    use dak_wire::{ClientId, DeviceId, Mid};

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn team() -> GroupId {
        GroupId::parse("team").unwrap()
    }

    fn command_from(from: &str, op: GroupOp, ts: u64) -> GroupCommand {
        GroupCommand {
            mid: Mid::from_ulid(ulid::Ulid::new()),
            id: ClientId::parse("c").unwrap(),
            from: user(from),
            from_device: DeviceId::parse("phone").unwrap(),
            group: team(),
            op,
            ts,
        }
    }

    fn chat(from: &str) -> Message {
        Message {
            mid: Mid::from_ulid(ulid::Ulid::new()),
            id: ClientId::parse("m").unwrap(),
            from: user(from),
            from_device: DeviceId::parse("phone").unwrap(),
            to: "team".into(),
            chat: ChatKind::Group,
            body: Some(serde_json::value::RawValue::from_string("1".into()).unwrap()),
            ephemeral: false,
            notice: None,
            ts: 1,
        }
    }

    fn recipients(applied: &Applied) -> Vec<&str> {
        applied
            .deliveries
            .iter()
            .map(|d| d.recipient.as_str())
            .collect()
    }

    fn system(applied: &Applied, i: usize) -> &SystemEvent {
        match &applied.deliveries[i].message.notice {
            Some(Notice::Group(e)) => e,
            other => panic!("expected a system notice, got {other:?}"),
        }
    }

    fn rejection(applied: &Applied) -> (&str, dak_wire::ErrorCode) {
        assert_eq!(applied.result, "rejected");
        assert_eq!(applied.deliveries.len(), 1);
        let d = &applied.deliveries[0];
        assert_eq!(
            d.device.as_ref().map(DeviceId::as_str),
            Some("phone"),
            "to the sending device"
        );
        match &d.message.notice {
            Some(Notice::Rejected { code, .. }) => (d.recipient.as_str(), *code),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn created(members: &[&str]) -> Option<Group> {
        let mut group = None;
        let op = GroupOp::Create {
            name: "Team".into(),
            members: members.iter().map(|m| user(m)).collect(),
        };
        let applied = command(&mut group, command_from("alice", op, 10), &limits(1024));
        assert!(applied.changed);
        group
    }

    #[test]
    fn create_makes_the_author_admin_and_tells_everyone() {
        let mut group = None;
        let op = GroupOp::Create {
            name: "Team".into(),
            members: vec![user("bob"), user("carol")],
        };
        let applied = command(
            &mut group,
            command_from("alice", op.clone(), 10),
            &limits(1024),
        );
        assert_eq!(recipients(&applied), ["alice", "bob", "carol"]);
        let event = system(&applied, 0);
        assert_eq!(
            (event.event, event.name.as_deref()),
            (SystemKind::Created, Some("Team"))
        );
        assert_eq!(event.users, [user("bob"), user("carol")]);
        let g = group.clone().unwrap();
        assert_eq!(g.member(&user("alice")).unwrap().role, Role::Admin);
        assert_eq!(g.member(&user("bob")).unwrap().role, Role::Member);

        // The same author creating it again changes nothing; someone else is refused.
        let again = command(
            &mut group,
            command_from("alice", op.clone(), 20),
            &limits(1024),
        );
        assert!(!again.changed && again.deliveries.is_empty());
        assert_eq!(group.as_ref(), Some(&g));
        let taken = command(&mut group, command_from("mallory", op, 30), &limits(1024));
        assert_eq!(
            rejection(&taken),
            ("mallory", dak_wire::ErrorCode::Forbidden)
        );
        assert_eq!(group.as_ref(), Some(&g));
    }

    #[test]
    fn only_admins_add_and_remove_others() {
        let mut group = created(&["bob"]);
        let add = |from| {
            command_from(
                from,
                GroupOp::Add {
                    members: vec![user("dave")],
                },
                20,
            )
        };
        let refused = command(&mut group, add("bob"), &limits(1024));
        assert_eq!(rejection(&refused), ("bob", dak_wire::ErrorCode::Forbidden));
        assert!(group.as_ref().unwrap().member(&user("dave")).is_none());

        let added = command(&mut group, add("alice"), &limits(1024));
        assert_eq!(
            recipients(&added),
            ["alice", "bob", "dave"],
            "the new member hears it too"
        );
        assert_eq!(system(&added, 0).event, SystemKind::Added);
        assert!(
            command(&mut group, add("alice"), &limits(1024))
                .deliveries
                .is_empty(),
            "adding again is a no-op"
        );

        let remove = |from| command_from(from, GroupOp::Remove { user: user("dave") }, 30);
        assert_eq!(
            rejection(&command(&mut group, remove("bob"), &limits(1024))).1,
            dak_wire::ErrorCode::Forbidden
        );
        let removed = command(&mut group, remove("alice"), &limits(1024));
        assert_eq!(
            recipients(&removed),
            ["alice", "bob", "dave"],
            "the removed member hears it too"
        );
        assert_eq!(system(&removed, 0).event, SystemKind::Removed);
        assert!(group.as_ref().unwrap().member(&user("dave")).is_none());

        let outsider = command(&mut group, add("mallory"), &limits(1024));
        assert_eq!(
            rejection(&outsider),
            ("mallory", dak_wire::ErrorCode::Forbidden)
        );
    }

    #[test]
    fn the_last_admin_leaving_promotes_the_longest_standing_member() {
        let mut group = created(&["carol"]);
        let add = command_from(
            "alice",
            GroupOp::Add {
                members: vec![user("bob")],
            },
            50,
        );
        command(&mut group, add, &limits(1024));
        let leave = command_from(
            "alice",
            GroupOp::Remove {
                user: user("alice"),
            },
            60,
        );
        let mid = leave.mid;
        let left = command(&mut group, leave, &limits(1024));
        // Everyone hears that alice left, alice included; then the rest hear that
        // carol, a member since creation, is admin now.
        assert_eq!(recipients(&left), ["alice", "bob", "carol", "bob", "carol"]);
        assert_eq!(system(&left, 0).event, SystemKind::Left);
        assert_eq!(system(&left, 3).event, SystemKind::Promoted);
        assert_eq!(system(&left, 3).users, [user("carol")]);
        assert_eq!(left.deliveries[3].message.mid, mid.next());
        let g = group.as_ref().unwrap();
        assert_eq!(g.member(&user("carol")).unwrap().role, Role::Admin);
        assert_eq!(g.member(&user("bob")).unwrap().role, Role::Member);

        // The last member leaving empties the group: it no longer exists.
        for who in ["bob", "carol"] {
            command(
                &mut group,
                command_from(who, GroupOp::Remove { user: user(who) }, 70),
                &limits(1024),
            );
        }
        assert!(group.as_ref().unwrap().members.is_empty());
        assert_eq!(
            rejection(&message(&group, &team(), chat("carol"))).1,
            dak_wire::ErrorCode::Forbidden
        );
    }

    #[test]
    fn messages_reach_members_only_while_members() {
        let mut group = created(&["bob", "carol"]);
        let applied = message(&group, &team(), chat("bob"));
        assert_eq!(
            recipients(&applied),
            ["alice", "bob", "carol"],
            "the sender's other devices too"
        );

        command(
            &mut group,
            command_from(
                "alice",
                GroupOp::Remove {
                    user: user("carol"),
                },
                20,
            ),
            &limits(1024),
        );
        assert_eq!(
            recipients(&message(&group, &team(), chat("bob"))),
            ["alice", "bob"]
        );
        let from_carol = message(&group, &team(), chat("carol"));
        assert_eq!(
            rejection(&from_carol),
            ("carol", dak_wire::ErrorCode::Forbidden)
        );
        assert_eq!(
            rejection(&message(&None, &team(), chat("bob"))).1,
            dak_wire::ErrorCode::Forbidden
        );

        let mut typing = chat("bob");
        typing.ephemeral = true;
        typing.notice = Some(Notice::Typing);
        assert_eq!(
            recipients(&message(&group, &team(), typing.clone())),
            ["alice"],
            "not to the typist"
        );
        assert!(
            message(&None, &team(), typing).deliveries.is_empty(),
            "typing is never answered"
        );
    }

    #[test]
    fn the_member_limit_holds() {
        let mut group = None;
        let op = GroupOp::Create {
            name: "Team".into(),
            members: vec![user("bob"), user("carol")],
        };
        assert_eq!(
            rejection(&command(
                &mut group,
                command_from("alice", op, 1),
                &limits(2)
            ))
            .1,
            dak_wire::ErrorCode::TooLarge
        );
        assert!(group.is_none());
        let mut group = created(&["bob"]);
        let add = command_from(
            "alice",
            GroupOp::Add {
                members: vec![user("carol"), user("dave")],
            },
            2,
        );
        assert_eq!(
            rejection(&command(&mut group, add, &limits(3))).1,
            dak_wire::ErrorCode::TooLarge
        );
        assert_eq!(group.unwrap().members.len(), 2);
    }

    #[test]
    fn renaming_tells_everyone_once() {
        let mut group = created(&["bob"]);
        let rename = || {
            command_from(
                "bob",
                GroupOp::Rename {
                    name: "Crew".into(),
                },
                5,
            )
        };
        let applied = command(&mut group, rename(), &limits(1024));
        assert_eq!(recipients(&applied), ["alice", "bob"]);
        assert_eq!(system(&applied, 0).name.as_deref(), Some("Crew"));
        assert!(command(&mut group, rename(), &limits(1024))
            .deliveries
            .is_empty());
        assert_eq!(group.unwrap().name, "Crew");
    }

    #[test]
    fn a_notice_names_a_bounded_number_of_users_and_counts_the_rest() {
        let members: Vec<String> = (0..1000)
            .map(|i| format!("{}-{i}", "u".repeat(120)))
            .collect();
        let op = GroupOp::Create {
            name: "Big".into(),
            members: members.iter().map(|m| user(m)).collect(),
        };
        let mut group = None;
        let applied = command(&mut group, command_from("alice", op, 10), &limits(1024));
        assert_eq!(applied.deliveries.len(), 1001, "every member hears of it");
        let event = system(&applied, 0);
        assert_eq!(event.users.len(), 64);
        assert_eq!(event.users[0], user(&members[0]));
        assert_eq!(event.count, Some(1000));
        // A small change names everyone and needs no count.
        let add = command_from(
            "alice",
            GroupOp::Add {
                members: vec![user("zoe")],
            },
            20,
        );
        let added = command(&mut group, add, &limits(1024));
        assert_eq!(system(&added, 0).users, [user("zoe")]);
        assert_eq!(system(&added, 0).count, None);
    }
}
