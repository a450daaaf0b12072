import GRPCCore

/// Finds a method's `MethodConfig` in a service config the way gRPC does (gRFC A21 / service_config.md): an entry
/// naming the service and method, else one naming only the service, else one naming neither (the default).
/// GRPCCore has this lookup but keeps it `package`; this one matches it: a later entry for the same name replaces an
/// earlier one.
struct MethodConfigLookup: Sendable {
    private var exact: [MethodConfig.Name: MethodConfig] = [:]
    private var byService: [String: MethodConfig] = [:]
    private var fallback: MethodConfig?

    init(_ serviceConfig: ServiceConfig) {
        for config in serviceConfig.methodConfig {
            for name in config.names {
                if name.service.isEmpty {
                    if name.method.isEmpty { self.fallback = config }
                } else if name.method.isEmpty {
                    self.byService[name.service] = config
                } else {
                    self.exact[name] = config
                }
            }
        }
    }

    subscript(descriptor: MethodDescriptor) -> MethodConfig? {
        let service = descriptor.service.fullyQualifiedService
        return self.exact[MethodConfig.Name(service: service, method: descriptor.method)]
            ?? self.byService[service] ?? self.fallback
    }
}
