//! The tests' admission webhook server ([`outpost_tests::hookd`]) as a program for a pod:
//! `outpost-hookd LISTEN CERT_FILE KEY_FILE`.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, cert, key] = &args[..] else {
        anyhow::bail!("usage: outpost-hookd LISTEN CERT_FILE KEY_FILE");
    };
    let cert = std::fs::read_to_string(cert)?;
    let key = std::fs::read_to_string(key)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen.as_str()).await?;
        println!("outpost-hookd serving on {listen}");
        outpost_tests::hookd::serve(listener, &cert, &key).await
    })
}
