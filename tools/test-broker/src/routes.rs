//! The route table: every request tansu's broker routes to its storage and coordinator, except
//! Fetch and ListOffsets, which are answered by this crate's services, plus EndTxn. ApiVersions
//! is derived from the table, so clients see EndTxn as supported.

use rama::{
    Layer as _, Service as _,
    layer::{MapErrLayer, MapStateLayer},
};
use tansu_broker::{
    Error,
    coordinator::group::Coordinator,
    service::{auth, coordinator, storage as routes},
};
use tansu_sans_io::{ApiKey as _, EndTxnRequest, FetchRequest, ListOffsetsRequest};
use tansu_service::{
    BytesFrameLayer, BytesFrameService, FrameRequestLayer, FrameRouteBuilder, FrameRouteService, TcpBytesLayer,
    TcpBytesService, TcpContext, TcpContextLayer, TcpContextService,
};
use tansu_storage::Storage;

use crate::{end_txn::EndTxnService, fetch::TxnAwareFetch, list_offsets::ListOffsetsService};

pub type ConnectionService = TcpContextService<TcpBytesService<BytesFrameService<FrameRouteService<(), Error>>, ()>>;

/// Adds `$service` as the route for `$request`s, with the storage as its state (as tansu's
/// own routes are built).
macro_rules! route {
    ($builder:expr, $storage:expr, $request:ty, $service:expr) => {{
        let storage = $storage;
        $builder.with_route(
            <$request>::KEY,
            (MapErrLayer::new(Error::from), MapStateLayer::new(|_| storage), FrameRequestLayer::<$request>::new())
                .into_layer($service)
                .boxed(),
        )
    }};
}

type Route<S> = fn(FrameRouteBuilder<(), Error>, S) -> Result<FrameRouteBuilder<(), Error>, Error>;

/// The service that answers one client connection.
pub fn connection_service<C, S>(cluster_id: &str, coordinator: C, storage: S) -> Result<ConnectionService, Error>
where
    C: Coordinator,
    S: Storage,
{
    let storage_routes: [Route<S>; 24] = [
        routes::add_offsets_to_txn,
        routes::add_partitions_to_txn,
        routes::alter_user_scram_credentials,
        routes::consumer_group_describe,
        routes::create_acls,
        routes::create_topics,
        routes::delete_groups,
        routes::delete_records,
        routes::delete_topics,
        routes::describe_acls,
        routes::describe_cluster,
        routes::describe_configs,
        routes::describe_groups,
        routes::describe_topic_partitions,
        routes::describe_user_scram_credentials,
        routes::find_coordinator,
        routes::get_telemetry_subscriptions,
        routes::incremental_alter_configs,
        routes::init_producer_id,
        routes::list_groups,
        routes::list_partition_reassignments,
        routes::metadata,
        routes::produce,
        routes::txn_offset_commit_request,
    ];
    let builder = storage_routes
        .iter()
        .try_fold(FrameRouteService::<(), Error>::builder(), |builder, route| route(builder, storage.clone()))?;
    let builder = route!(builder, storage.clone(), FetchRequest, TxnAwareFetch)?;
    let builder = route!(builder, storage.clone(), ListOffsetsRequest, ListOffsetsService)?;
    let builder = route!(builder, storage, EndTxnRequest, EndTxnService)?;
    let route = coordinator::services(builder, coordinator).and_then(auth::services)?.build()?;
    Ok((
        TcpContextLayer::new(TcpContext::default().cluster_id(Some(cluster_id.into()))),
        TcpBytesLayer::default(),
        BytesFrameLayer::default(),
    )
        .into_layer(route))
}
