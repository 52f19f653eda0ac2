//! The file aggregate: create in a folder, rename, move, delete, comment.
//!
//! Comments live in the file's stream: a comment on a deleted file is refused
//! by the same decision that sees the deletion, with no cross-stream read.

use scaleout::domain::{Aggregate, DomainError};
use scaleout::domain_event;

use super::values::{Author, CommentText, FileName, Id};
use crate::pb;

domain_event!(
    /// Everything that happens to a file.
    FileEvent {
        Created(pb::FileCreated),
        Renamed(pb::FileRenamed),
        Moved(pb::FileMoved),
        Deleted(pb::FileDeleted),
        CommentAdded(pb::CommentAdded),
    }
);

/// What a user can ask of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCommand {
    Create { name: FileName, folder_id: Id },
    Rename { new_name: FileName },
    Move { to_folder_id: Id },
    Delete,
    AddComment { author: Author, text: CommentText },
}

/// A file's state, as far as decisions need it; snapshotted as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum File {
    #[default]
    Missing,
    Active {
        name: String,
        folder_id: String,
    },
    /// A deleted file keeps its id: it cannot be created again.
    Deleted,
}

impl Aggregate for File {
    const STREAM_TYPE: &'static str = "file";
    type Command = FileCommand;
    type Event = FileEvent;

    fn decide(&self, id: &str, command: &FileCommand) -> Result<Vec<FileEvent>, DomainError> {
        match (self, command) {
            (File::Missing, FileCommand::Create { name, folder_id }) => {
                Ok(vec![FileEvent::Created(pb::FileCreated {
                    file_id: id.to_owned(),
                    name: name.as_str().to_owned(),
                    folder_id: folder_id.to_string(),
                })])
            }
            (File::Missing, _) => Err(DomainError::NotFound {
                kind: "file",
                id: id.to_owned(),
            }),
            (File::Active { .. } | File::Deleted, FileCommand::Create { .. }) => {
                Err(DomainError::AlreadyExists {
                    kind: "file",
                    id: id.to_owned(),
                })
            }
            (File::Deleted, _) => Err(refused(
                id,
                "FILE_DELETED",
                format!("file {id} was deleted"),
            )),
            (File::Active { name, folder_id }, command) => {
                decide_active(id, name, folder_id, command).map(|event| vec![event])
            }
        }
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self).ok()
    }

    fn from_snapshot(state: &[u8]) -> Option<Self> {
        serde_json::from_slice(state).ok()
    }

    fn apply(&mut self, event: FileEvent) {
        match (self, event) {
            (state, FileEvent::Created(created)) => {
                *state = File::Active {
                    name: created.name,
                    folder_id: created.folder_id,
                };
            }
            (File::Active { name, .. }, FileEvent::Renamed(renamed)) => *name = renamed.new_name,
            (File::Active { folder_id, .. }, FileEvent::Moved(moved)) => {
                *folder_id = moved.to_folder_id;
            }
            (state, FileEvent::Deleted(_)) => *state = File::Deleted,
            // Comments do not change what decisions depend on.
            (_, FileEvent::CommentAdded(_)) => {}
            // An event can only follow the state that decided it; the log is the truth.
            (_, FileEvent::Renamed(_) | FileEvent::Moved(_)) => {}
        }
    }
}

/// Decides a command other than create for a file that exists.
fn decide_active(
    id: &str,
    name: &str,
    folder_id: &str,
    command: &FileCommand,
) -> Result<FileEvent, DomainError> {
    let file_id = id.to_owned();
    Ok(match command {
        FileCommand::Create { .. } => {
            return Err(DomainError::AlreadyExists {
                kind: "file",
                id: file_id,
            });
        }
        FileCommand::Rename { new_name } if new_name.as_str() == name => {
            let why = format!("file {id} is already named {name:?}");
            return Err(refused(id, "NAME_UNCHANGED", why));
        }
        FileCommand::Rename { new_name } => FileEvent::Renamed(pb::FileRenamed {
            file_id,
            old_name: name.to_owned(),
            new_name: new_name.as_str().to_owned(),
            folder_id: folder_id.to_owned(),
        }),
        FileCommand::Move { to_folder_id } if to_folder_id.as_str() == folder_id => {
            let why = format!("file {id} is already in folder {folder_id}");
            return Err(refused(id, "ALREADY_IN_FOLDER", why));
        }
        FileCommand::Move { to_folder_id } => FileEvent::Moved(pb::FileMoved {
            file_id,
            from_folder_id: folder_id.to_owned(),
            to_folder_id: to_folder_id.to_string(),
            name: name.to_owned(),
        }),
        FileCommand::Delete => FileEvent::Deleted(pb::FileDeleted {
            file_id,
            folder_id: folder_id.to_owned(),
        }),
        FileCommand::AddComment { author, text } => FileEvent::CommentAdded(pb::CommentAdded {
            file_id,
            author: author.as_str().to_owned(),
            text: text.as_str().to_owned(),
        }),
    })
}

fn refused(id: &str, rule: &'static str, description: String) -> DomainError {
    DomainError::Precondition {
        rule,
        subject: format!("file/{id}"),
        description,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scaleout::domain::testing::given;

    fn name(value: &str) -> FileName {
        FileName::parse(value).unwrap()
    }

    fn folder(value: &str) -> Id {
        Id::parse(value).unwrap()
    }

    fn created() -> FileEvent {
        FileEvent::Created(pb::FileCreated {
            file_id: "f1".into(),
            name: "a.txt".into(),
            folder_id: "docs".into(),
        })
    }

    fn deleted() -> FileEvent {
        FileEvent::Deleted(pb::FileDeleted {
            file_id: "f1".into(),
            folder_id: "docs".into(),
        })
    }

    #[test]
    fn create_in_a_folder() {
        given::<File>([])
            .when(
                "f1",
                FileCommand::Create {
                    name: name("a.txt"),
                    folder_id: folder("docs"),
                },
            )
            .then([created()]);
    }

    #[test]
    fn create_twice_already_exists_even_after_delete() {
        let create = FileCommand::Create {
            name: name("a.txt"),
            folder_id: folder("docs"),
        };
        let exists = DomainError::AlreadyExists {
            kind: "file",
            id: "f1".into(),
        };
        given::<File>([created()])
            .when("f1", create.clone())
            .then_err(exists.clone());
        given::<File>([created(), deleted()])
            .when("f1", create)
            .then_err(exists);
    }

    #[test]
    fn rename_records_old_and_new_name() {
        given::<File>([created()])
            .when(
                "f1",
                FileCommand::Rename {
                    new_name: name("b.txt"),
                },
            )
            .then([FileEvent::Renamed(pb::FileRenamed {
                file_id: "f1".into(),
                old_name: "a.txt".into(),
                new_name: "b.txt".into(),
                folder_id: "docs".into(),
            })]);
    }

    #[test]
    fn rename_to_the_same_name_is_refused() {
        given::<File>([created()])
            .when(
                "f1",
                FileCommand::Rename {
                    new_name: name("a.txt"),
                },
            )
            .then_rule("NAME_UNCHANGED");
    }

    #[test]
    fn move_into_the_folder_it_is_in_is_refused() {
        given::<File>([created()])
            .when(
                "f1",
                FileCommand::Move {
                    to_folder_id: folder("docs"),
                },
            )
            .then_rule("ALREADY_IN_FOLDER");
    }

    #[test]
    fn move_then_move_back() {
        let moved = FileEvent::Moved(pb::FileMoved {
            file_id: "f1".into(),
            from_folder_id: "docs".into(),
            to_folder_id: "archive".into(),
            name: "a.txt".into(),
        });
        given::<File>([created()])
            .when(
                "f1",
                FileCommand::Move {
                    to_folder_id: folder("archive"),
                },
            )
            .then([moved.clone()]);
        given::<File>([created(), moved])
            .when(
                "f1",
                FileCommand::Move {
                    to_folder_id: folder("docs"),
                },
            )
            .then([FileEvent::Moved(pb::FileMoved {
                file_id: "f1".into(),
                from_folder_id: "archive".into(),
                to_folder_id: "docs".into(),
                name: "a.txt".into(),
            })]);
    }

    #[test]
    fn delete_remembers_the_folder() {
        given::<File>([created()])
            .when("f1", FileCommand::Delete)
            .then([deleted()]);
    }

    #[test]
    fn a_deleted_file_refuses_everything_but_reports_why() {
        for command in [
            FileCommand::Rename {
                new_name: name("b.txt"),
            },
            FileCommand::Move {
                to_folder_id: folder("x"),
            },
            FileCommand::Delete,
            FileCommand::AddComment {
                author: Author::parse("ann").unwrap(),
                text: CommentText::parse("hi").unwrap(),
            },
        ] {
            given::<File>([created(), deleted()])
                .when("f1", command)
                .then_rule("FILE_DELETED");
        }
    }

    #[test]
    fn commands_on_an_unknown_file_are_not_found() {
        given::<File>([])
            .when("nope", FileCommand::Delete)
            .then_err(DomainError::NotFound {
                kind: "file",
                id: "nope".into(),
            });
    }

    #[test]
    fn comment_on_a_file() {
        given::<File>([created()])
            .when(
                "f1",
                FileCommand::AddComment {
                    author: Author::parse("ann").unwrap(),
                    text: CommentText::parse("looks good").unwrap(),
                },
            )
            .then([FileEvent::CommentAdded(pb::CommentAdded {
                file_id: "f1".into(),
                author: "ann".into(),
                text: "looks good".into(),
            })]);
    }
}
