//! EndTxn: commits or aborts a transaction through the storage's `txn_end`, which writes the
//! commit/abort markers to every partition the transaction produced to and applies (on commit)
//! the consumer offsets it carried.

use rama::{Context, Service};
use tansu_sans_io::{EndTxnRequest, EndTxnResponse};
use tansu_storage::{Error, Storage};

#[derive(Clone, Copy, Debug, Default)]
pub struct EndTxnService;

impl<G> Service<G, EndTxnRequest> for EndTxnService
where
    G: Storage,
{
    type Response = EndTxnResponse;
    type Error = Error;

    async fn serve(&self, ctx: Context<G>, req: EndTxnRequest) -> Result<EndTxnResponse, Error> {
        let error_code = match ctx
            .state()
            .txn_end(req.transactional_id.as_str(), req.producer_id, req.producer_epoch, req.committed)
            .await
        {
            Ok(code) => code,
            // Fencing and unknown-id outcomes are answers for the client, not broker failures.
            Err(Error::Api(code)) => code,
            Err(other) => return Err(other),
        };
        Ok(EndTxnResponse::default().throttle_time_ms(0).error_code(i16::from(error_code)))
    }
}
