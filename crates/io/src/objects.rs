//! An object store: a local directory or an S3-compatible bucket (`object_store`), opened from
//! one location string. The archive keeps its days here.
//!
//! Every object is published whole: a local file is written beside its name and renamed over
//! it, an S3 object is not visible until its upload completes. So a reader never sees half a
//! file, whatever stops the writer.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Size of the pieces a file is uploaded in.
const UPLOAD_CHUNK: usize = 8 << 20;

/// S3-compatible settings (used when the location is `s3://bucket/prefix`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint of an S3-compatible service (MinIO, Ceph, ...); empty: AWS.
    pub endpoint: String,
    /// Region.
    pub region: String,
    /// Access key id; empty: the environment's credentials (instance profile, IRSA, AWS_*).
    pub access_key_id: String,
    /// Secret access key (from a Secret: METRONOME_ARCHIVE__S3__SECRET_ACCESS_KEY).
    pub secret_access_key: String,
    /// Allow a plain-HTTP endpoint (an in-cluster MinIO).
    pub allow_http: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".to_owned(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            allow_http: false,
        }
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &if self.secret_access_key.is_empty() { "" } else { "***" })
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// Why an object store call failed (paths and store errors; never record contents).
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// The location does not parse or cannot be opened.
    #[error("archive location {location}: {reason}")]
    Location {
        /// The location as configured.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A store call failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// Reading the staged file or sending it failed.
    #[error("uploading the staged file: {0}")]
    Staged(#[from] std::io::Error),
}

/// An opened store.
#[derive(Debug, Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    location: String,
    /// The directory, for a local store.
    local_root: Option<std::path::PathBuf>,
}

impl Objects {
    /// Opens `location`: a directory (created if missing; `file://` optional) or
    /// `s3://bucket[/prefix]`.
    pub fn open(location: &str, s3: &S3Config) -> Result<Self, ObjectsError> {
        let bad = |reason: String| ObjectsError::Location { location: location.to_owned(), reason };
        let mut local_root = None;
        let store: Arc<dyn ObjectStore> = if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket named".to_owned()));
            }
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket).with_region(&s3.region);
            if !s3.endpoint.is_empty() {
                b = b.with_endpoint(&s3.endpoint);
            }
            if !s3.access_key_id.is_empty() {
                b = b.with_access_key_id(&s3.access_key_id).with_secret_access_key(&s3.secret_access_key);
            }
            let s3_store = b.with_allow_http(s3.allow_http).build().map_err(|e| bad(e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3_store)
            } else {
                Arc::new(PrefixStore::new(s3_store, prefix))
            }
        } else {
            let dir = location.strip_prefix("file://").unwrap_or(location);
            if dir.is_empty() {
                return Err(bad("empty".to_owned()));
            }
            std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
            local_root = Some(std::path::PathBuf::from(dir));
            Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(|e| bad(e.to_string()))?)
        };
        Ok(Self { store, location: location.to_owned(), local_root })
    }

    /// The location it was opened at.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Uploads the whole of `file` (from its start) to `path`. The object appears only once
    /// complete.
    pub async fn put_file(&self, path: &str, file: &mut std::fs::File) -> Result<(), ObjectsError> {
        file.seek(SeekFrom::Start(0))?;
        let mut writer = BufWriter::new(Arc::clone(&self.store), ObjectPath::from(path));
        let mut chunk = vec![0u8; UPLOAD_CHUNK];
        loop {
            let sent = match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => writer.write_all(&chunk[..n]).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                let _ = writer.abort().await;
                return Err(e.into());
            }
        }
        writer.shutdown().await?;
        Ok(())
    }

    /// Removes what an upload interrupted by a crash left under `prefix`: a local store writes an
    /// object as `NAME#N` and renames it into place, and a killed process leaves the `#` file.
    /// (S3 shows nothing of an unfinished upload; a bucket lifecycle rule aborts its parts.)
    pub fn remove_interrupted_uploads(&self, prefix: &str) -> Result<usize, ObjectsError> {
        let Some(root) = &self.local_root else { return Ok(0) };
        let dir = root.join(prefix);
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().contains('#') {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes `bytes` to `path` in one put.
    pub async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<(), ObjectsError> {
        self.store.put(&ObjectPath::from(path), PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// The object at `path`, or `None` when there is none.
    pub async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, ObjectsError> {
        match self.store.get(&ObjectPath::from(path)).await {
            Ok(r) => Ok(Some(r.bytes().await?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// sha256 of the object at `path`, streamed.
    pub async fn sha256(&self, path: &str) -> Result<String, ObjectsError> {
        let mut stream = self.store.get(&ObjectPath::from(path)).await?.into_stream();
        let mut hash = Sha256::new();
        while let Some(piece) = stream.next().await {
            hash.update(&piece?);
        }
        Ok(hex::encode(hash.finalize()))
    }

    /// Every object under `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, ObjectsError> {
        let prefix = ObjectPath::from(prefix);
        let mut out = Vec::new();
        let mut stream = self.store.list(Some(&prefix));
        while let Some(meta) = stream.next().await {
            out.push(meta?.location.to_string());
        }
        out.sort();
        Ok(out)
    }

    /// The names of the folders directly under `prefix` (the last segment of each), sorted.
    pub async fn folders(&self, prefix: &str) -> Result<Vec<String>, ObjectsError> {
        let listing = self.store.list_with_delimiter(Some(&ObjectPath::from(prefix))).await?;
        let mut names: Vec<String> =
            listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_owned)).collect();
        names.sort();
        Ok(names)
    }

    /// Deletes `first` (the manifest: the day stops being complete), then everything else under
    /// `prefix`.
    pub async fn delete_prefix(&self, prefix: &str, first: &str) -> Result<(), ObjectsError> {
        match self.store.delete(&ObjectPath::from(first)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let rest = self.list(prefix).await?;
        for path in &rest {
            match self.store.delete(&ObjectPath::from(path.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A local store keeps the emptied directory, which would list as a day again.
        if let Some(root) = &self.local_root {
            let _ = std::fs::remove_dir(root.join(prefix));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_store_publishes_lists_and_deletes_whole_objects() {
        let dir = tempfile::tempdir().unwrap();
        let objects = Objects::open(&format!("file://{}", dir.path().display()), &S3Config::default()).unwrap();
        let mut staged = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut staged, b"partition bytes").unwrap();
        objects.put_file("t/day=2026-12-01/partition-00000.pb.gz", &mut staged).await.unwrap();
        objects.put_bytes("t/day=2026-12-01/manifest.json", b"{}".to_vec()).await.unwrap();
        objects.put_bytes("t/day=2026-12-02/manifest.json", b"{}".to_vec()).await.unwrap();

        assert_eq!(objects.get("t/day=2026-12-01/partition-00000.pb.gz").await.unwrap().unwrap(), b"partition bytes");
        assert_eq!(objects.get("t/day=2026-12-03/manifest.json").await.unwrap(), None);
        assert_eq!(objects.folders("t").await.unwrap(), ["day=2026-12-01", "day=2026-12-02"]);
        assert_eq!(
            objects.sha256("t/day=2026-12-01/manifest.json").await.unwrap(),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );

        std::fs::write(dir.path().join("t/day=2026-12-02/partition-00000.pb.gz#7"), b"half").unwrap();
        assert_eq!(objects.remove_interrupted_uploads("t/day=2026-12-02").unwrap(), 1);
        objects.delete_prefix("t/day=2026-12-01", "t/day=2026-12-01/manifest.json").await.unwrap();
        assert_eq!(objects.folders("t").await.unwrap(), ["day=2026-12-02"]);
        assert_eq!(objects.list("t").await.unwrap(), ["t/day=2026-12-02/manifest.json"]);
    }

    #[test]
    fn a_location_without_a_bucket_or_a_directory_is_refused() {
        for location in ["s3://", "s3:///prefix", ""] {
            let err = Objects::open(location, &S3Config::default()).unwrap_err();
            assert!(matches!(err, ObjectsError::Location { .. }), "{location}: {err}");
        }
    }
}
