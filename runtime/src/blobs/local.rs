//! [`LocalBlobs`]: objects as files in a directory (`confab serve`). `blobs/<ab>/<name>` holds the
//! objects (the first two hex digits fan them out), `staging/<uuid>` the uploads under way. A
//! commit is a rename, atomic on one file system.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{
    BlobError, BlobInfo, BlobName, BlobRead, Blobs, ByteChunks, Hashing, Presentation, Staged,
};

#[derive(Debug)]
pub struct LocalBlobs {
    root: PathBuf,
}

fn unavailable(error: std::io::Error) -> BlobError {
    BlobError::Unavailable(error.to_string())
}

impl LocalBlobs {
    /// Opens (creating) the directory `root`.
    pub fn open(root: &Path) -> std::io::Result<LocalBlobs> {
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("staging"))?;
        Ok(LocalBlobs {
            root: root.to_owned(),
        })
    }

    pub(crate) fn path(&self, name: &BlobName) -> PathBuf {
        self.root
            .join("blobs")
            .join(&name.as_str()[..2])
            .join(name.as_str())
    }

    fn staging(&self, key: &str) -> PathBuf {
        self.root.join("staging").join(key)
    }

    async fn write_staging(
        &self,
        path: &Path,
        mut body: ByteChunks,
        hashing: &mut Hashing,
    ) -> Result<(), BlobError> {
        let mut file = tokio::fs::File::create(path).await.map_err(unavailable)?;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            hashing.update(&chunk)?;
            file.write_all(&chunk).await.map_err(unavailable)?;
        }
        file.sync_all().await.map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl Blobs for LocalBlobs {
    async fn check(&self) -> Result<(), BlobError> {
        tokio::fs::metadata(self.root.join("staging"))
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn stage(
        &self,
        body: ByteChunks,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<Staged, BlobError> {
        let body = super::of_length(body, length);
        let key = uuid::Uuid::new_v4().simple().to_string();
        let path = self.staging(&key);
        let mut hashing = Hashing::new(max_bytes);
        match self.write_staging(&path, body, &mut hashing).await {
            Ok(()) => Ok(hashing.finish(key)),
            Err(error) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(error)
            }
        }
    }

    async fn commit(&self, staged: &Staged) -> Result<(), BlobError> {
        let target = self.path(&staged.name);
        let from = self.staging(&staged.key);
        if tokio::fs::try_exists(&target).await.map_err(unavailable)? {
            return tokio::fs::remove_file(&from).await.map_err(unavailable);
        }
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(unavailable)?;
        }
        // Identical bytes under an identical name: a racing commit is overwritten with the same.
        tokio::fs::rename(&from, &target).await.map_err(unavailable)
    }

    async fn discard(&self, staged: &Staged) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.staging(&staged.key)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(unavailable(e)),
            _ => Ok(()),
        }
    }

    async fn put(&self, bytes: Bytes) -> Result<BlobName, BlobError> {
        let len = bytes.len() as u64;
        let staged = self
            .stage(
                futures::stream::once(async move { Ok(bytes) }).boxed(),
                Some(len),
                len,
            )
            .await?;
        self.commit(&staged).await?;
        Ok(staged.name)
    }

    async fn size(&self, name: &BlobName) -> Result<Option<u64>, BlobError> {
        match tokio::fs::metadata(self.path(name)).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn get(&self, name: &BlobName, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        let mut file = match tokio::fs::File::open(self.path(name)).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound);
            }
            Err(e) => return Err(unavailable(e)),
        };
        let size = file.metadata().await.map_err(unavailable)?.len();
        let (start, len) = match range {
            Some((start, end)) if start <= end && end < size => (start, end - start + 1),
            Some(_) => (size, 0),
            None => (0, size),
        };
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(unavailable)?;
        let reader = file.take(len);
        Ok(BlobRead {
            chunks: tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024).boxed(),
            len,
        })
    }

    async fn presign(
        &self,
        _name: &BlobName,
        _ttl: Duration,
        _presentation: &Presentation,
    ) -> Result<Option<String>, BlobError> {
        Ok(None)
    }

    async fn list(
        &self,
        after: Option<&BlobName>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>, BlobError> {
        let root = self.root.join("blobs");
        let after = after.cloned();
        tokio::task::spawn_blocking(move || -> Result<Vec<BlobInfo>, BlobError> {
            let mut shards: Vec<String> = std::fs::read_dir(&root)
                .map_err(unavailable)?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|s| s.len() == 2)
                .collect();
            shards.sort();
            let mut found = Vec::new();
            for shard in shards {
                if after
                    .as_ref()
                    .is_some_and(|a| shard.as_str() < &a.as_str()[..2])
                {
                    continue;
                }
                let mut names: Vec<(BlobName, std::fs::Metadata)> =
                    std::fs::read_dir(root.join(&shard))
                        .map_err(unavailable)?
                        .filter_map(|e| {
                            let e = e.ok()?;
                            let name = BlobName::parse(e.file_name().to_str()?)?;
                            Some((name, e.metadata().ok()?))
                        })
                        .filter(|(name, _)| after.as_ref().is_none_or(|a| name > a))
                        .collect();
                names.sort_by(|a, b| a.0.cmp(&b.0));
                for (name, meta) in names {
                    let modified = meta
                        .modified()
                        .map(OffsetDateTime::from)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                    found.push(BlobInfo {
                        name,
                        size: meta.len(),
                        modified,
                    });
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
            Ok(found)
        })
        .await
        .map_err(|e| BlobError::Unavailable(e.to_string()))?
    }

    async fn delete(&self, name: &BlobName) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path(name)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(unavailable(e)),
            _ => Ok(()),
        }
    }

    async fn sweep_staging(&self, age: Duration) -> Result<u64, BlobError> {
        let mut entries = tokio::fs::read_dir(self.root.join("staging"))
            .await
            .map_err(unavailable)?;
        let mut removed = 0;
        while let Some(entry) = entries.next_entry().await.map_err(unavailable)? {
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|elapsed| elapsed >= age);
            if old && tokio::fs::remove_file(entry.path()).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}
