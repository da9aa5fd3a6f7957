//! The protocol frontends built into this `ferry`.

use std::sync::Arc;

use ferry_core::frontend::Frontend;

use crate::config::MqttConfig;

/// One instance of every built-in frontend, for [`ServerBuilder::frontend`](crate::ServerBuilder::frontend).
pub fn builtin(mqtt: &MqttConfig) -> Vec<Arc<dyn Frontend>> {
    let settings = ferry_mqtt::Settings {
        queue_qos0_offline: mqtt.queue_qos0_offline,
        max_inflight: mqtt.max_inflight,
        receive_maximum: mqtt.receive_maximum,
        topic_alias_maximum: mqtt.topic_alias_maximum,
        max_keep_alive: mqtt.max_keep_alive,
        ..ferry_mqtt::Settings::default()
    };
    vec![Arc::new(ferry_mqtt::MqttFrontend::new(settings)), Arc::new(ferry_amqp::AmqpFrontend::default())]
}
