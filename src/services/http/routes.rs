//! The REST route table, read at start-up from the `google.api.http` option
//! of every RPC in the descriptor the server is built from.

use http::Method;
use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MethodDescriptor,
    Value,
};

/// One REST route: an HTTP method and path template bound to one RPC.
#[derive(Debug, Clone)]
pub struct Route {
    pub http_method: Method,
    pub template: PathTemplate,
    /// The template as annotated (`/auth/users/{user_id}`), for OpenAPI.
    pub pattern: String,
    /// `/aimessage.v1.AuthService/Login`: where the call is dispatched.
    pub grpc_path: http::uri::PathAndQuery,
    pub method: MethodDescriptor,
    /// `body: "*"`: the request message comes as the JSON body.
    pub has_body: bool,
}

/// A path template: literal segments, `{field}` variables, an optional
/// `:verb` after the last segment (`/messages:stream`).
#[derive(Debug, Clone)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    verb: Option<String>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    /// The field path a variable binds (`{user_id}`, or `{a.b}`).
    Variable(Vec<FieldDescriptor>),
}

/// Path variables of a matched route: the field path and the decoded text.
pub type Bindings = Vec<(Vec<FieldDescriptor>, String)>;

/// What a method and path find in the table.
pub enum Lookup<'t> {
    Found(&'t Route, Bindings),
    /// The path exists under other methods (listed for `Allow`).
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Every annotated RPC of every service in `pool`. An annotation that
    /// names an unknown field or uses a form the server does not serve is an
    /// error: the descriptor is ours, so that is a bug to fail on at once.
    pub fn from_pool(pool: &DescriptorPool) -> Result<Self, String> {
        let Some(http_rule) = pool.get_extension_by_name("google.api.http") else {
            return Ok(Self::default());
        };
        let mut routes = Vec::new();
        for service in pool.services() {
            for method in service.methods() {
                if let Some(route) = route_of(&http_rule, &method)? {
                    routes.push(route);
                }
            }
        }
        Ok(Self { routes })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn lookup(&self, method: &Method, path: &str) -> Lookup<'_> {
        let mut allowed = Vec::new();
        for route in &self.routes {
            let Some(bindings) = route.template.matches(path) else {
                continue;
            };
            if route.http_method == method {
                return Lookup::Found(route, bindings);
            }
            if !allowed.contains(&route.http_method) {
                allowed.push(route.http_method.clone());
            }
        }
        if allowed.is_empty() {
            Lookup::NotFound
        } else {
            Lookup::MethodNotAllowed(allowed)
        }
    }
}

fn route_of(
    http_rule: &ExtensionDescriptor,
    method: &MethodDescriptor,
) -> Result<Option<Route>, String> {
    let options = method.options();
    if !options.has_extension(http_rule) {
        return Ok(None);
    }
    let rule = options.get_extension(http_rule);
    let Some(rule) = rule.as_message() else {
        return Err(format!(
            "{}: google.api.http is not a message",
            method.full_name()
        ));
    };
    let (http_method, pattern) = pattern_of(rule)
        .ok_or_else(|| format!("{}: google.api.http has no pattern", method.full_name()))?;
    let body = string_field(rule, "body");
    if !(body.is_empty() || body == "*") {
        return Err(format!(
            "{}: only body \"*\" is served, not {body:?}",
            method.full_name()
        ));
    }
    let template = PathTemplate::parse(&pattern, &method.input())
        .map_err(|error| format!("{}: {pattern}: {error}", method.full_name()))?;
    let grpc_path = format!("/{}/{}", method.parent_service().full_name(), method.name())
        .parse()
        .map_err(|_| format!("{}: not a valid path", method.full_name()))?;
    Ok(Some(Route {
        http_method,
        template,
        pattern,
        grpc_path,
        method: method.clone(),
        has_body: body == "*",
    }))
}

fn string_field(message: &DynamicMessage, name: &str) -> String {
    message
        .get_field_by_name(name)
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn pattern_of(rule: &DynamicMessage) -> Option<(Method, String)> {
    for (name, method) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(name) {
            return Some((method, string_field(rule, name)));
        }
    }
    None
}

impl PathTemplate {
    fn parse(pattern: &str, input: &prost_reflect::MessageDescriptor) -> Result<Self, String> {
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err("a template starts with /".to_owned());
        };
        // A verb follows the last `:` that is not inside a variable.
        let (path, verb) = match rest.rfind(':') {
            Some(colon) if !rest[colon..].contains('}') => {
                (&rest[..colon], Some(rest[colon + 1..].to_owned()))
            }
            _ => (rest, None),
        };
        let segments = path
            .split('/')
            .map(|segment| match segment.strip_prefix('{') {
                Some(variable) => {
                    let name = variable
                        .strip_suffix('}')
                        .ok_or_else(|| format!("unclosed variable {segment}"))?;
                    if name.contains('=') {
                        return Err(format!("variable patterns are not served: {segment}"));
                    }
                    field_path(input, name).map(Segment::Variable)
                }
                None if segment.is_empty() || segment.contains(['{', '}', '*']) => {
                    Err(format!("unsupported segment {segment:?}"))
                }
                None => Ok(Segment::Literal(segment.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { segments, verb })
    }

    /// The decoded values of the variables, if `path` fits this template.
    fn matches(&self, path: &str) -> Option<Bindings> {
        let mut rest = path.strip_prefix('/')?;
        if let Some(verb) = &self.verb {
            rest = rest.strip_suffix(verb.as_str())?.strip_suffix(':')?;
        }
        let mut bindings = Vec::new();
        let mut parts = rest.split('/');
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(literal) => {
                    if part != literal {
                        return None;
                    }
                }
                Segment::Variable(fields) => {
                    if part.is_empty() {
                        return None;
                    }
                    let text = percent_encoding::percent_decode_str(part)
                        .decode_utf8()
                        .ok()?
                        .into_owned();
                    bindings.push((fields.clone(), text));
                }
            }
        }
        parts.next().is_none().then_some(bindings)
    }

    /// The top-level fields the variables bind (left out of query and body docs).
    pub fn bound_fields(&self) -> impl Iterator<Item = &FieldDescriptor> {
        self.segments.iter().filter_map(|segment| match segment {
            Segment::Variable(fields) => fields.first(),
            Segment::Literal(_) => None,
        })
    }
}

/// Resolves `a.b.c` against `message`: every step but the last a singular
/// message field. Names are proto names or lowerCamel JSON names.
pub fn field_path(
    message: &prost_reflect::MessageDescriptor,
    dotted: &str,
) -> Result<Vec<FieldDescriptor>, String> {
    let mut path = Vec::new();
    let mut current = message.clone();
    let mut names = dotted.split('.').peekable();
    while let Some(name) = names.next() {
        let field = current
            .get_field_by_name(name)
            .or_else(|| current.get_field_by_json_name(name))
            .ok_or_else(|| format!("no field {name} in {}", current.full_name()))?;
        if names.peek().is_some() {
            match field.kind() {
                Kind::Message(inner) if !field.is_list() && !field.is_map() => current = inner,
                _ => return Err(format!("{name} is not a message field")),
            }
        }
        path.push(field);
    }
    Ok(path)
}

/// Sets the field at `path` (from [`field_path`]) in `message` to `value`,
/// appending for a repeated field.
pub fn set_at_path(message: &mut DynamicMessage, path: &[FieldDescriptor], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut target = message;
    for parent in parents {
        let Some(next) = target.get_field_mut(parent).as_message_mut() else {
            return;
        };
        target = next;
    }
    if last.is_list() {
        if let Some(list) = target.get_field_mut(last).as_list_mut() {
            list.push(value);
        }
    } else {
        target.set_field(last, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        RouteTable::from_pool(&pool).unwrap()
    }

    #[test]
    fn every_rpc_of_the_four_services_has_a_route() {
        assert_eq!(table().routes().len(), 37);
    }

    #[test]
    fn literal_paths_variables_and_verbs_are_told_apart() {
        let table = table();
        let found = |method: Method, path: &str| match table.lookup(&method, path) {
            Lookup::Found(route, bindings) => Some((
                route.method.name().to_owned(),
                bindings
                    .into_iter()
                    .map(|(_, text)| text)
                    .collect::<Vec<_>>(),
            )),
            _ => None,
        };
        assert_eq!(
            found(Method::GET, "/messages:stream").unwrap().0,
            "StreamMessages"
        );
        assert_eq!(
            found(Method::POST, "/messages:markRead").unwrap().0,
            "MarkRead"
        );
        assert_eq!(
            found(Method::GET, "/messages/42").unwrap(),
            ("GetMessage".to_owned(), vec!["42".to_owned()])
        );
        assert_eq!(
            found(Method::GET, "/auth/users/7/roles").unwrap(),
            ("GetUserRoles".to_owned(), vec!["7".to_owned()])
        );
        assert_eq!(found(Method::GET, "/auth/me").unwrap().0, "GetMe");
        assert_eq!(found(Method::PUT, "/auth/me").unwrap().0, "UpdateMe");
        assert!(found(Method::GET, "/auth/users//roles").is_none());
        assert!(found(Method::GET, "/auth/me/").is_none());
        assert!(matches!(
            table.lookup(&Method::GET, "/nowhere"),
            Lookup::NotFound
        ));
        match table.lookup(&Method::PATCH, "/auth/me") {
            Lookup::MethodNotAllowed(allowed) => assert_eq!(allowed, [Method::GET, Method::PUT]),
            _ => panic!("PATCH /auth/me is a known path under other methods"),
        }
    }

    #[test]
    fn variables_are_percent_decoded() {
        let table = table();
        let Lookup::Found(_, bindings) = table.lookup(&Method::DELETE, "/auth/roles/%34%32") else {
            panic!("DELETE /auth/roles/{{role_id}} is a route");
        };
        assert_eq!(bindings[0].1, "42");
    }
}
