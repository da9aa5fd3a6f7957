//! The protocol frontends built into this `ferry`.

use std::sync::Arc;

use ferry_core::frontend::Frontend;

/// One instance of every built-in frontend, for [`ServerBuilder::frontend`](crate::ServerBuilder::frontend).
pub fn builtin() -> Vec<Arc<dyn Frontend>> {
    vec![Arc::new(ferry_mqtt::MqttFrontend::default()), Arc::new(ferry_amqp::AmqpFrontend::default())]
}
