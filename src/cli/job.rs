//! `prompt --job`: a durable job published to JetStream, its replies
//! followed on the default reply subject.

use opencode_nats_bridge::bus::Caller;
use opencode_nats_bridge::config::Config;

/// A durable job: its default reply subject subscribed first, then the job
/// published with a JetStream acknowledgement (it is stored when this
/// returns).
pub(super) async fn open_job(
    caller: &Caller,
    cfg: &Config,
    subject: &str,
    trace_id: &str,
    body: String,
) -> Result<opencode_nats_bridge::bus::ReplyStream, String> {
    use opencode_nats_bridge::protocol::job;
    use opencode_nats_bridge::protocol::tenant::Route;
    let Route::Prompt { caller: who, .. } =
        job::route(&cfg.jetstream.jobs_subject, &cfg.route_subjects(), subject)
    else {
        return Err(format!("{subject} is not a job subject"));
    };
    if let Some(why) = caller.jetstream_missing().await {
        return Err(format!(
            "cannot publish a job: {why}; jobs need JetStream (docs/CLUSTER.md)"
        ));
    }
    let listen = cfg.reply_rules().default_subject(&who, trace_id);
    let replies = caller.listen(&listen).await.map_err(|e| e.to_string())?;
    let seq = caller
        .publish_job(subject, body.into_bytes())
        .await
        .map_err(|e| {
            format!("{e} (no jobs stream captures it: has a daemon with [jetstream] jobs ever started on this NATS server?)")
        })?;
    eprintln!("opencode-nats-bridge: job stored (stream sequence {seq}); replies on {listen}");
    Ok(replies)
}
