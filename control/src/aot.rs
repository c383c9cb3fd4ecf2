//! Ahead-of-time compilation for nodes without a compiler: a module is compiled once per
//! architecture on a control plane member and kept on its disk (beside the cluster CA's
//! directory, in `aot/`), so a fleet of small boards never runs Cranelift. The artifact goes
//! to the node over its link as an [`Artifact`] the node verifies before loading.

use std::path::PathBuf;
use std::sync::Arc;

use outpost_api::{sha256_hex, Artifact};
use outpost_wasm_runtime::Compiler;

#[derive(Debug, thiserror::Error)]
pub enum AotError {
    /// The module does not compile (the message says why); a client error.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
}

/// One member's compiler and artifact cache.
#[derive(Default)]
pub struct Aot {
    compiler: Arc<Compiler>,
    dir: Option<PathBuf>,
    /// One compile at a time: each one already uses every core.
    one: tokio::sync::Mutex<()>,
}

impl Aot {
    pub fn new(dir: Option<PathBuf>) -> Aot {
        Aot {
            dir,
            ..Aot::default()
        }
    }

    fn path(&self, hex: &str, arch: &str) -> Option<PathBuf> {
        // The binary's version keys the cache: a new wasmtime makes old artifacts useless.
        let v = env!("CARGO_PKG_VERSION");
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{hex}.{arch}.{v}.cwasm")))
    }

    /// The artifact of module `hex` for `arch`: from the cache, else compiled from `wasm()`.
    pub async fn artifact<F>(&self, hex: &str, arch: &str, wasm: F) -> Result<Artifact, AotError>
    where
        F: std::future::Future<Output = Result<Vec<u8>, AotError>>,
    {
        let path = self.path(hex, arch);
        let read = |p: &Option<PathBuf>| p.as_ref().and_then(|p| std::fs::read(p).ok());
        let code = match read(&path) {
            Some(c) => c,
            None => {
                let _one = self.one.lock().await;
                match read(&path) {
                    Some(c) => c,
                    None => {
                        let bytes = wasm.await?;
                        if sha256_hex(&bytes) != hex {
                            return Err(AotError::Invalid(format!(
                                "the module sent is not sha256:{hex}"
                            )));
                        }
                        let code = self.compile(arch, bytes).await?;
                        if let Some(p) = &path {
                            store(p, &code);
                        }
                        code
                    }
                }
            }
        };
        Ok(Artifact {
            module: format!("sha256:{hex}"),
            arch: arch.to_string(),
            sha256: sha256_hex(&code),
            code,
        })
    }

    async fn compile(&self, arch: &str, bytes: Vec<u8>) -> Result<Vec<u8>, AotError> {
        let arch = arch.to_string();
        let compiler = self.compiler.clone();
        tokio::task::spawn_blocking(move || compiler.compile(&arch, &bytes))
            .await
            .map_err(|e| AotError::Internal(e.to_string()))?
            .map_err(|e| match e {
                outpost_wasm_runtime::Error::Invalid(m)
                | outpost_wasm_runtime::Error::Unsupported(m) => AotError::Invalid(m),
                other => AotError::Internal(other.to_string()),
            })
    }
}

/// Write the artifact whole or not at all; a cache that cannot be written only costs a
/// compile next time.
fn store(path: &std::path::Path, code: &[u8]) {
    let tmp = path.with_extension("tmp");
    let r = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, code))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), error = %e, "caching a compiled artifact failed");
    }
}
